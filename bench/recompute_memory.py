"""Activation recompute: what each of Megatron-LM's recompute settings keeps for the backward
pass, what it costs in time, and what the planner's memory model predicts.

    python bench/recompute_memory.py                       # ~1 min on 2 CPU cores
    python bench/recompute_memory.py --quick --out /tmp/r.json

One process (a gloo world of one rank), one GPT-MoE built by ``pretrain_moe.py``'s own code
(flags → ``transformer_config_from_args`` → ``build_gpt_moe_model``), the same weights and
tokens for every setting. Per setting, one forward + backward of a micro-batch is measured:

* **kept for backward**: the bytes of every tensor autograd saves during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once, parameters left
  out, read when the forward ends — so an output that selective recompute discards
  (``CheckpointWithoutOutput`` frees its storage) counts as freed;
* **fwd+bwd ms**: the median of ``--reps`` timed passes after one warm-up, the settings
  interleaved round by round (this host is noisy: compare ratios within one run);
* the loss, which must equal the run without recompute (checked: a setting that changed the
  function would be a bug, not a trade-off).

The host's load is accounted as for the testbed benchmarks (:mod:`bench.testbed_jobs`:
``--max-load``, ``--max-foreign-cores``, ``--retries``, ``--wait-idle-s``, the ``clean``
verdict).

The planner's activation estimate (``monta.planner.memory``, the CPU testbed's device: no
flash attention) is given for every setting, to compare with the measured peak.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import add_output_args, result_header, write_result  # noqa: E402
from bench.testbed_jobs import (  # noqa: E402
    LoadPolicy, accounted, add_load_args, load_record, warn_if_loaded,
)

MB = 1e6
SETTINGS = {  # name: recompute flags
    "none": [],
    "selective core_attn": ["--recompute-granularity", "selective", "--recompute-modules",
                            "core_attn"],
    "selective layernorm": ["--recompute-granularity", "selective", "--recompute-modules",
                            "layernorm"],
    "selective moe_act": ["--recompute-granularity", "selective", "--recompute-modules",
                          "moe_act"],
    "selective moe": ["--recompute-granularity", "selective", "--recompute-modules", "moe"],
    "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
             "--recompute-num-layers", "1"],
}


def model_flags(quick: bool) -> list[str]:
    layers, hidden, seq, mbs = (2, 128, 128, 2) if quick else (4, 256, 512, 4)
    return ["--num-layers", str(layers), "--hidden-size", str(hidden),
            "--num-attention-heads", "8", "--group-query-attention", "--num-query-groups", "4",
            "--ffn-hidden-size", str(2 * hidden), "--swiglu", "--disable-bias-linear",
            "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights",
            "--num-experts", "8", "--moe-router-topk", "2", "--moe-grouped-gemm",
            "--moe-token-dispatcher-type", "monta", "--seq-length", str(seq),
            "--micro-batch-size", str(mbs), "--vocab-size", "4096"]


class SavedForBackward:
    """The tensors autograd saves while active, held weakly: :meth:`live_bytes` counts the
    storages still allocated (each once), and every save updates the peak of that count, so
    the recompute's saves during the backward pass reach it too."""

    def __init__(self, exclude_ptrs: set[int]):
        self.exclude, self.saved, self.peak = exclude_ptrs, [], 0

    def pack(self, tensor):
        if tensor.untyped_storage().data_ptr() not in self.exclude:
            self.saved.append(weakref.ref(tensor))
            self.peak = max(self.peak, self.live_bytes())
        return tensor

    def live_bytes(self) -> int:
        storages = {}
        for ref in self.saved:
            tensor = ref()
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def build(flags: list[str]):
    import torch

    from monta.training.arguments import parse_args
    from monta.training.config import transformer_config_from_args
    from monta.model import build_gpt_moe_model

    args = parse_args(flags)
    torch.manual_seed(0)
    model = build_gpt_moe_model(transformer_config_from_args(args), args.vocab_size,
                                args.seq_length)
    return args, model


def one_pass(model, tokens, measure: bool) -> tuple[float, int | None, int | None, float]:
    """(loss, bytes kept for backward when the forward ends, peak of saved bytes over forward
    and backward — both None unless ``measure`` — and seconds of forward + backward)."""
    import torch

    saved, hooks = None, contextlib.nullcontext()
    if measure:
        saved = SavedForBackward({p.untyped_storage().data_ptr() for p in model.parameters()})
        hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with hooks:
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        kept = saved.live_bytes() if saved else None
        loss.backward()
    seconds = time.perf_counter() - start
    return loss.item(), kept, saved.peak if saved else None, seconds


def planner_option(setting: str) -> str:
    """The planner's recompute option (monta/planner/plan.py) for a :data:`SETTINGS` name."""
    from monta.planner.recompute import selective

    granularity, _, module = setting.partition(" ")
    return selective(module) if granularity == "selective" else granularity


def planner_activations(args) -> dict[str, float]:
    """{setting: the planner's activation estimate in MB} for this one-rank model."""
    from monta.planner.cluster import load_cluster
    from monta.planner.layout import Layout
    from monta.planner.memory import memory_estimate
    from monta.planner.model import model_from_args, workload_from_args

    model, workload = model_from_args(args), workload_from_args(args)
    device = load_cluster("testbed_1gbit").device
    rows = workload.seq_length * workload.micro_batch_size * model.topk  # every expert here
    return {name: memory_estimate(model, Layout(1, 1), workload, device, rows, 1.0,
                                  planner_option(name), 1, False).activations_GB * 1e9 / MB
            for name in SETTINGS}


def run(args: argparse.Namespace, base: list[str]) -> dict:
    """The rows (one per setting) and the planner's estimates, for ``base`` model flags."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from monta.compat import apply_cpu_patches
    from monta.testing.distributed import find_free_port

    apply_cpu_patches()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}",
                            rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    try:
        built = {name: build(base + extra) for name, extra in SETTINGS.items()}
        first_args = built["none"][0]
        tokens = torch.randint(0, first_args.vocab_size, (first_args.micro_batch_size,
                                                          first_args.seq_length),
                               generator=torch.Generator().manual_seed(1))
        rows = {name: {"flags": SETTINGS[name], "seconds": []} for name in SETTINGS}
        for name, (_, model) in built.items():  # warm-up, the loss and the bytes kept
            loss, kept, peak, _ = one_pass(model, tokens, True)
            rows[name].update(loss=loss, kept_bytes=kept, peak_bytes=peak)
        for _ in range(args.reps):  # interleaved rounds: every setting once per round
            for name, (_, model) in built.items():
                rows[name]["seconds"].append(one_pass(model, tokens, False)[3])
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    none = rows["none"]
    for name, row in rows.items():
        if abs(row["loss"] - none["loss"]) > 1e-6 * abs(none["loss"]):
            raise AssertionError(f"{name}: loss {row['loss']} differs from no recompute's "
                                 f"{none['loss']}: recompute changed the function")
        row["median_ms"] = statistics.median(row["seconds"]) * 1e3
        row["kept_vs_none"] = row["kept_bytes"] / none["kept_bytes"]
        row["peak_vs_none"] = row["peak_bytes"] / none["peak_bytes"]
        row["time_vs_none"] = row["median_ms"] / none["median_ms"]
    return {"rows": rows, "planner_activations_MB": planner_activations(first_args)}


def markdown(result: dict) -> str:
    from bench.harness import provenance_line

    planner = result["planner_activations_MB"]
    lines = ["# Activation recompute: bytes kept for the backward pass, time, planner", "",
             provenance_line(result), "",
             f"Model: `{' '.join(result['settings']['model_flags'])}`; one micro-batch, one "
             f"rank; fwd+bwd: median of {result['settings']['reps']} interleaved passes.", "",
             "| setting | kept for backward when the forward ends (MB) | vs none | peak of "
             "saved (MB) | vs none | planner activations (MB) | fwd+bwd (ms) | vs none |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["rows"].items():
        predicted = planner.get(name)
        lines.append(f"| {name} | {row['kept_bytes'] / MB:.1f} | {row['kept_vs_none']:.2f} "
                     f"| {row['peak_bytes'] / MB:.1f} | {row['peak_vs_none']:.2f} | "
                     f"{'—' if predicted is None else f'{predicted:.1f}'} "
                     f"| {row['median_ms']:.0f} | {row['time_vs_none']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> str:
    from monta.plotting import pyplot, skipped

    plt = pyplot(path)
    if plt is None:
        return skipped(path)
    names = list(result["rows"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.barh(names, [result["rows"][n]["kept_bytes"] / MB for n in names])
    ax.set_xlabel("MB kept for the backward pass (one micro-batch)")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_args(parser, REPO / "bench" / "results" / "recompute_memory.json",
                    "MB kept for the backward pass per setting")
    parser.add_argument("--quick", action="store_true", help="a smaller model (smoke test)")
    parser.add_argument("--reps", type=int, default=5, help="timed passes per setting")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_load_args(parser)
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    started = time.perf_counter()
    policy, loads = LoadPolicy.from_args(args, "recompute_memory"), []
    base = model_flags(args.quick)
    warn_if_loaded(policy)
    measured = accounted("recompute settings", policy, loads, lambda: run(args, base))
    result = {**result_header("recompute_memory", args, model_flags=base),
              **load_record(loads, policy), **measured}
    write_result("recompute_memory", result, args, markdown, plot,
                 seconds=round(time.perf_counter() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
