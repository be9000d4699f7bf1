"""GPU tier benchmark: grouped-GEMM experts, the MoE layer vs megatron-core, a ~0.8B training run.

Run on one GPU, from the repo root (megatron-core installed; ~2 min on an H200)::

    python bench/gpu_moe.py --out bench/results/gpu_moe.json     # also writes gpu_moe.md
    python bench/gpu_moe.py --tiny --out /tmp/gpu_moe.json       # smoke run (CPU works too)

Sections, all in one process and one run, so every comparison is side by side on one device:

* ``peak``: a dense bf16 8192³ matmul, the TFLOP/s ceiling MFU is measured against;
* ``expert_gemm``: at Mixtral-8x7B shapes (h 4096, ffn 14336, 8 experts, top-2) and
  DeepSeek-style fine-grained shapes (h 2048, ffn 1408, 64 experts, top-6), 8192 tokens routed
  top-k by random logits: each projection as one grouped GEMM on MoNTA's default kernel and on
  ``torch._grouped_mm`` (our parameter layout, and the transposed one for reference), as a
  per-expert loop of ``torch.mm`` (+ cat), and as one dense GEMM of the same FLOPs; then the
  whole expert FFN (fc1, SwiGLU·prob, fc2) forward + backward those ways, in interleaved rounds;
* ``moe_layer``: router + permutation + experts + combine, forward + backward, bf16:
  megatron-core 0.16.1's ``MoELayer`` with its ``alltoall`` dispatcher and ``SequentialMLP``
  (what ``pretrain_moe.py`` ran on a GPU without TE before grouped experts) vs MoNTA's layer with
  :class:`monta.experts.MoNTAGroupedMLP` under MoNTA's dispatcher (its one-rank path) and under
  megatron's ``alltoall``; same weights, so the same routing; output differences reported.
  Host syncs per forward + backward are counted with torch's sync debug mode, and a
  ``torch.profiler`` trace gives the top kernels (``profile``);
* ``training``: ``torchrun --nproc-per-node 1 pretrain_moe.py --bf16 --moe-grouped-gemm`` on a
  ~0.8B-parameter GPT-MoE (mock data): tokens/s, MFU (model FLOPs / the ``peak`` measured
  above), peak memory, and a profile of two iterations (``bench/gpu_moe_train.py``).

Times are medians over repetitions timed with CUDA events after warm-up (the first calls
compile the fused activation); the MoE layer's variants are timed in interleaved rounds.
Results go to ``--out`` as they come (a section that fails records its error and the rest still
run); ``bench/gpu_moe_report.py`` renders the Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_timing import (  # noqa: E402
    Timer, tflops, time_interleaved, with_env, with_envs, with_grouped_gemm,
)
from monta import expert_gemm  # noqa: E402
from monta.provenance import source_commit  # noqa: E402

SHAPES = {  # name: hidden, expert ffn, experts, top-k
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, topk=2),
    "fine_grained": dict(hidden=2048, ffn=1408, experts=64, topk=6),
}
TINY_SHAPES = {"mixtral": dict(hidden=64, ffn=96, experts=8, topk=2),
               "fine_grained": dict(hidden=64, ffn=48, experts=16, topk=4)}
# ---------------------------------------------------------------------------- peak


def bench_peak(device, dtype, timer, tiny: bool) -> dict:
    n = 512 if tiny else 8192
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    t = timer(lambda: torch.mm(a, b), warmup=3, reps=20)
    return {"shape": [n, n, n], "dtype": str(dtype), **t,
            "tflops": tflops(2 * n**3, t["median_ms"])}


# ---------------------------------------------------------------------------- expert GEMMs


def routed_counts(tokens: int, experts: int, topk: int, device) -> torch.Tensor:
    """Tokens per expert from top-k of random logits (about balanced, never exactly)."""
    gen = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(tokens, experts, device=device, generator=gen)
    chosen = logits.topk(topk, dim=1).indices.reshape(-1)
    return torch.bincount(chosen, minlength=experts)


PROJECTION_ROUNDS = 4  # interleaved rounds of one projection's GEMMs, 5 timed calls each
# what a Megatron-LM user turns on (RoPE fusion is on by default; bench/gpu_train_fusions.py
# measures both)
TRAIN_FUSIONS = ("--cross-entropy-loss-fusion",)
FFN_ROUNDS = 6  # interleaved rounds of the expert-FFN variants, 3 timed calls each
FFN_CHAIN = 4  # and 2 samples each of this many calls back to back (the loop left out)
# the grouped kernels' default for every expert size until the 128x128 ping-pong configs, now
# the large-expert one (monta/expert_gemm.py): the row GEMMs on 128x256 cooperative tiles, the
# weight gradient on torch (SwiGLU·prob fused into fc1 where it runs)
PREVIOUS_DEFAULT = expert_gemm.SM90 + ",".join(expert_gemm.SM90_LARGE_EXPERT_CONFIGS)


def padded_rows(counts: torch.Tensor, rows: int, alignment: int | None):
    """The rows MoNTA's one-rank dispatcher hands its grouped experts: each expert's rows start
    at a multiple of ``alignment`` where the aligned GEMMs run (monta/dispatch/padded_order.py),
    pads copying row 0. Returns (which row each padded row copies, pads [capacity] bool, counts
    carrying the padded ends, where each real row went), or None without an alignment."""
    from monta.dispatch.padded_order import padded_capacity, padded_positions

    if not alignment:
        return None
    positions, ends = padded_positions(counts, alignment, rows=rows)
    capacity = padded_capacity(rows, counts.numel(), alignment)
    source = torch.zeros(capacity, dtype=torch.long, device=counts.device)
    source.index_copy_(0, positions, torch.arange(rows, device=counts.device))
    pads = torch.ones(capacity, dtype=torch.bool, device=counts.device).index_fill_(
        0, positions, False)
    tokens_per_expert = counts.clone()
    tokens_per_expert.row_ends = ends
    return source, pads, tokens_per_expert, positions


def padded_like(padded, t: torch.Tensor, pads: float | None = None) -> torch.Tensor:
    """``t``'s rows laid out as :func:`padded_rows` says: pad rows copy row 0, or hold ``pads``
    (the gradient of a zero-probability row is 0)."""
    source, pad_rows = padded[:2]
    laid = t[source]
    return laid if pads is None else laid.masked_fill(pad_rows.unsqueeze(1), pads)


def padded_ffn_inputs(padded, x, probs, grad):
    """The expert FFN's input (a fresh leaf), probabilities (0 on pads) and output gradient on
    :func:`padded_rows`' layout."""
    return (padded_like(padded, x.detach()).requires_grad_(True),
            padded_like(padded, probs, pads=0.0), padded_like(padded, grad))


def monta_experts(shape: dict, w1: torch.Tensor, w2: torch.Tensor, device, dtype):
    """A ``MoNTAGroupedMLP`` of ``shape`` whose weights are ``w1`` [E, H, 2F] and ``w2`` [E,
    F, H] (the same memory: its parameters are viewed as these per expert)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from bench.gpu_moe_layer import layer_config
    from monta.experts import MoNTAGroupedMLP

    experts = MoNTAGroupedMLP(shape["experts"], layer_config(shape, "monta", True, device, dtype),
                              pg_collection=get_default_pg_collection())
    experts.weight1 = torch.nn.Parameter(w1.detach().view(shape["hidden"], -1))
    experts.weight2 = torch.nn.Parameter(w2.detach().view(-1, shape["hidden"]))
    return experts.to(device).train()


def bench_expert_gemm(shape: dict, tokens: int, device, dtype, timer) -> dict:
    from monta import per_expert_gemm, sm90_gemm, swiglu_gemm, wgrad_overlap
    from monta.experts import (activation_with_probs, expert_offsets, grouped_mm,
                               grouped_mm_supported)

    h, f, e, k = shape["hidden"], shape["ffn"], shape["experts"], shape["topk"]
    counts = routed_counts(tokens, e, k, device)
    host_counts = counts.tolist()
    n = sum(host_counts)
    offsets = expert_offsets(counts, device)
    probe = torch.empty(n, h, device=device, dtype=dtype)  # the experts' input's shape
    gen = torch.Generator(device=device).manual_seed(2)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=gen) * scale).to(dtype)

    # MoNTA's opt-in padded rows (MONTA_EXPERT_ROW_ALIGNMENT=tile): its aligned kernels on each
    # expert's rows padded as the dispatcher pads them (FLOPs below count only the real rows,
    # so the pads are charged to it)
    tile = (with_env("MONTA_EXPERT_ROW_ALIGNMENT", "tile",
                     lambda: expert_gemm.row_alignment(rand(1, 8)))
            if device.type == "cuda" else None)
    padded = padded_rows(counts, n, tile)
    out = {"tokens": tokens, "rows": n, "tokens_per_expert": {"min": min(host_counts),
                                                             "max": max(host_counts)},
           "per_expert_by_default": device.type == "cuda" and per_expert_gemm.per_expert_wanted(
               n, (e, f, h), "default"),
           "padded_row_alignment": tile, "projections": {},
           # what the grouped kernels run by default on these rows (monta/expert_gemm.py)
           "default_kernels": with_grouped_gemm("grouped", lambda: {
               "grouped_gemm_default": expert_gemm._pin(probe, offsets),
               "fused_swiglu": swiglu_gemm.fused_passes(probe, offsets),
               # the sm90 config whose fc1 runs fused there, None where Triton's would
               "sm90_fused_fc1": swiglu_gemm.sm90_fc1_config(
                   probe, torch.empty(e, h, 2 * f, device="meta", dtype=dtype), offsets)})}
    if padded is not None:
        out["padded_rows"] = padded[0].numel()
        out["padded_rows_used"] = int(padded[2].row_ends[-1])
    for proj, (kk, nn) in {"fc1": (h, 2 * f), "fc2": (f, h)}.items():
        x, w = rand(n, kk), rand(e, kk, nn, scale=kk ** -0.5)
        w_t = rand(e, nn, kk, scale=kk ** -0.5).transpose(1, 2)  # [E, K, N] column-major
        dense_w = rand(kk, nn, scale=kk ** -0.5)
        fast = grouped_mm_supported(x, w)
        variants = {
            "grouped": lambda: with_grouped_gemm("default",
                                                 lambda: grouped_mm(x, w, counts, offsets)),
            "grouped_torch": lambda: torch._grouped_mm(x, w, offs=offsets),
            "loop": lambda: torch.cat([p @ w[i]
                                       for i, p in enumerate(torch.split(x, host_counts))]),
            "dense": lambda: x @ dense_w,
        }
        if padded is not None:
            padded_x, padded_counts = padded_like(padded, x), padded[2]
            padded_ends = expert_offsets(padded_counts, device)
            variants["grouped_padded"] = lambda: with_grouped_gemm(
                "default", lambda: grouped_mm(padded_x, w, padded_counts, padded_ends))
        if fast:
            variants["grouped_transposed_weights"] = lambda: torch._grouped_mm(x, w_t, offs=offsets)
        else:
            del variants["grouped_torch"]
        flops = 2 * n * kk * nn
        row = {"K": kk, "N": nn, "flops": flops, "grouped_kernel": fast}
        if "grouped_padded" in variants:  # its real rows, against torch's
            got = variants["grouped_padded"]()[padded[3]].float()
            want = variants["grouped_torch"]().float()
            row["grouped_padded_rel_err"] = ((got - want).norm() / want.norm()).item()
        ops = _per_op_variants(x, w, dense_w, rand(n, nn), counts, offsets) if fast else {}
        # one set of interleaved rounds for the projection's variants and its per-op GEMMs, so
        # every "% of dense" compares samples taken at the same clock
        samples, _ = time_interleaved({name: ("default", fn) for name, fn in
                                       {**variants, **ops}.items()}, timer, PROJECTION_ROUNDS,
                                      reps=5)
        for name in variants:
            row[name] = _stats(samples[name], flops)
        for name in variants:
            row[name]["fraction_of_dense"] = row[name]["tflops"] / row["dense"]["tflops"]
        if ops:
            row["per_op"] = _per_op(samples, flops, row)
        out["projections"][proj] = row

    # whole expert FFN, forward + backward
    x = rand(n, h).requires_grad_(True)
    probs = torch.rand(n, 1, device=device, generator=gen)
    w1, w2 = rand(e, h, 2 * f, scale=h ** -0.5), rand(e, f, h, scale=f ** -0.5)
    d1, d2 = rand(h, 2 * f, scale=h ** -0.5), rand(f, h, scale=f ** -0.5)
    for t in (w1, w2, d1, d2):
        t.requires_grad_(True)
    grad = rand(n, h)
    padded_ffn = None
    if padded is not None:  # as the dispatcher lays them out: pads copy row 0, probability 0
        padded_ffn = (*padded_ffn_inputs(padded, x, probs, grad), padded[2])

    experts = monta_experts(shape, w1, w2, device, dtype)
    fusable = swiglu_gemm.supported(x, w1, w2)

    def monta_ffn(x, probs, grad, counts, fused=None, wgrad_stream=None):
        """MoNTA's experts as its MoE layer runs them (``MoNTAGroupedMLP``); ``fused``:
        MONTA_FUSED_SWIGLU (monta/swiglu_gemm.py), ``wgrad_stream``: MONTA_WGRAD_STREAM
        (monta/wgrad_overlap.py), their defaults if None."""
        env = {name: value for name, value in ((swiglu_gemm.FUSE_VARIABLE, fused),
                                               (wgrad_overlap.VARIABLE, wgrad_stream))
               if value is not None}

        def run():
            experts(x, counts, probs.view(-1))[0].backward(grad)
        return (lambda: with_envs(env, run)) if env else run

    def loop_ffn():  # SequentialMLP's shape of work: per expert fc1, eager SwiGLU·prob, fc2
        outs = []
        for i, (xe, pe) in enumerate(zip(torch.split(x, host_counts),
                                         torch.split(probs, host_counts))):
            gate, up = torch.chunk(xe @ w1[i], 2, dim=-1)
            outs.append(((F.silu(gate) * up) * pe).to(dtype) @ w2[i])
        torch.cat(outs).backward(grad)

    def dense_ffn():
        a = activation_with_probs(x @ d1, probs, F.silu, True)
        (a @ d2).backward(grad)

    def clear():
        for t in (x, w1, w2, d1, d2, *experts.parameters(), *(padded_ffn[:1] if padded_ffn else ())):
            t.grad = None

    out["activation_fwd_bwd"] = bench_activation(n, f, device, dtype, timer)
    flops = 3 * 2 * n * (h * 2 * f + f * h)
    ffn = {"flops": flops}
    # (MONTA_GROUPED_GEMM pin, fn). grouped: MoNTA's default: one cuBLAS GEMM per expert for
    # large experts (monta/per_expert_gemm.py), else the grouped kernels of monta/expert_gemm.py
    # with SwiGLU·prob fused into fc1 where monta/swiglu_gemm.py runs; per_expert / grouped_only:
    # always / never per expert; grouped_unfused / grouped_fused_fwd / grouped_fused_all: the
    # grouped kernels with the activation as its own kernels / fused into fc1's forward / into
    # fc2's input gradient too; grouped_fused_bwd: only its backward, in fc2's input gradient
    # on the sm90 kernel (monta/csrc/sm90_swiglu_dgrad.cuh); previous_default: the grouped
    # kernels' default before the ping-pong configs (PREVIOUS_DEFAULT, activation fused into
    # fc1); grouped_padded: on padded rows (the aligned kernels); grouped_torch: torch._grouped_mm for every GEMM, the
    # activation unfused; grouped_balanced: the default on exactly n / E rows per expert (not
    # an achievable routing: it prices the partly filled last tile per expert). Interleaved
    # rounds, so clock and thermal drift favour no variant.
    variants = {"grouped": ("default", monta_ffn(x, probs, grad, counts)),
                "grouped_torch": ("torch", monta_ffn(x, probs, grad, counts, "0")),
                "loop": ("torch", loop_ffn), "dense": ("torch", dense_ffn)}
    if device.type == "cuda":
        variants["per_expert"] = ("cublas", monta_ffn(x, probs, grad, counts))
        variants["grouped_only"] = ("grouped", monta_ffn(x, probs, grad, counts))
        # the default with every GEMM on one stream: what the weight gradients' side stream buys
        variants["one_stream"] = ("default", monta_ffn(x, probs, grad, counts, wgrad_stream="0"))
    if fusable:
        variants["grouped_unfused"] = ("grouped", monta_ffn(x, probs, grad, counts, "0"))
        variants["grouped_fused_fwd"] = ("grouped", monta_ffn(x, probs, grad, counts, "fwd"))
        variants["grouped_fused_all"] = ("grouped", monta_ffn(x, probs, grad, counts, "all"))
    if swiglu_gemm.supported(x, w1, w2, "bwd"):
        variants["grouped_fused_bwd"] = ("grouped", monta_ffn(x, probs, grad, counts, "bwd"))
    if expert_gemm.SM90_LARGE_EXPERT_CONFIGS[0] in sm90_gemm.built_configs():
        variants["previous_default"] = (PREVIOUS_DEFAULT, monta_ffn(x, probs, grad, counts, "fwd"))
    if padded_ffn is not None:
        variants["grouped_padded"] = ("default", monta_ffn(*padded_ffn))
    if n % e == 0:  # every expert n / E rows: what routing imbalance (partial tiles) costs
        variants["grouped_balanced"] = ("default",
                                        monta_ffn(x, probs, grad, torch.full_like(counts, n // e)))
    samples, _ = time_interleaved(variants, timer, FFN_ROUNDS, reps=3, setup=clear)
    for name, times in samples.items():
        ffn[name] = _stats(times, flops)
    # back to back, as a training step runs them: the host queues the next call while the GPU
    # runs this one, so launch latency is off the clock (for dense and grouped alike)
    chained, _ = time_interleaved({k: v for k, v in variants.items() if k != "loop"}, timer,
                                  FFN_ROUNDS, reps=2, setup=clear, chain=FFN_CHAIN)
    for name, times in chained.items():
        ms = statistics.median(times)
        ffn[name].update(chained_median_ms=ms, chained_samples_ms=times, chain=FFN_CHAIN,
                         chained_tflops=tflops(flops, ms))
    for name in variants:
        ffn[name]["fraction_of_dense"] = ffn[name]["tflops"] / ffn["dense"]["tflops"]
        if name in chained:
            ffn[name]["chained_fraction_of_dense"] = (ffn[name]["chained_tflops"]
                                                      / ffn["dense"]["chained_tflops"])
    out["ffn_fwd_bwd"] = ffn
    return out


def _per_op_variants(x, w, dense_w, dy, counts, offsets) -> dict:
    """Where a projection's forward + backward time goes: the input-gradient (``dy @ wᵀ``) and
    weight-gradient (``xᵀ @ dy`` per expert) GEMMs as ``torch._grouped_mm``'s autograd runs
    them, each beside the dense GEMM of the same shape; and the forward with every expert
    given exactly n / E rows (no partly filled last tile per expert: the cost of routing
    imbalance, not an achievable number). {name: fn}, timed with the projection's variants."""
    from monta.experts import expert_offsets

    ops = {"dgrad_grouped": lambda: torch._grouped_mm(dy, w.transpose(1, 2), offs=offsets),
           "dgrad_dense": lambda: dy @ dense_w.t(),
           "wgrad_grouped": lambda: torch._grouped_mm(x.t(), dy, offs=offsets),
           "wgrad_dense": lambda: x.t() @ dy}
    n, e = x.size(0), counts.numel()
    if n % e == 0:
        even = expert_offsets(torch.full_like(counts, n // e), x.device)
        ops["fwd_balanced_grouped"] = lambda: torch._grouped_mm(x, w, offs=even)
    return ops


def _per_op(samples: dict, flops: float, row: dict) -> dict:
    """The per-op table's entries from :func:`_per_op_variants`' samples."""
    result = {}
    for op in ("dgrad", "wgrad"):
        grouped, dense = (_stats(samples[f"{op}_{kind}"], flops) for kind in ("grouped", "dense"))
        result[op] = {"grouped": grouped, "dense": dense,
                      "fraction_of_dense": grouped["tflops"] / dense["tflops"]}
    if "fwd_balanced_grouped" in samples:
        balanced = _stats(samples["fwd_balanced_grouped"], flops)
        result["fwd_balanced"] = {"grouped": balanced,
                                  "fraction_of_dense": balanced["tflops"] / row["dense"]["tflops"]}
    return result


def _stats(times: list, flops: float) -> dict:
    ms = statistics.median(times)
    return {"median_ms": ms, "min_ms": min(times), "max_ms": max(times), "reps": len(times),
            "samples_ms": times, "tflops": tflops(flops, ms)}


def bench_activation(n: int, f: int, device, dtype, timer) -> dict:
    """SwiGLU × prob forward + backward on [n, 2F], each implementation; GB/s counts the
    least traffic: read h, write y; read h and dy, write dh (8 bytes per bf16 element of y)."""
    from monta.experts import activation_with_probs

    gen = torch.Generator(device=device).manual_seed(4)
    h = torch.randn(n, 2 * f, device=device, generator=gen).to(dtype).requires_grad_(True)
    probs = torch.rand(n, 1, device=device, generator=gen).requires_grad_(True)
    dy = torch.randn(n, f, device=device, generator=gen).to(dtype)
    moved = 8 * n * f * h.element_size()
    rows = {}
    impls = ("triton", "compiled", "eager") if device.type == "cuda" else ("eager",)
    for impl in impls:
        def clear():
            h.grad = probs.grad = None

        try:
            t = timer(lambda impl=impl: activation_with_probs(h, probs, F.silu, True, impl)
                      .backward(dy), warmup=3, reps=10, setup=clear)
            rows[impl] = {**t, "GB_per_s": moved / (t["median_ms"] * 1e-3) / 1e9}
        except Exception as error:  # one implementation missing here: report, go on
            rows[impl] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return rows


# ---------------------------------------------------------------------------- driver


def init_world(device) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from monta.compat import apply_cpu_patches

    apply_cpu_patches()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)


def environment(device) -> dict:
    import megatron.core

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "python": platform.python_version(), "device_type": device.type,
            "command": " ".join(sys.argv)}
    try:
        import transformer_engine  # noqa: F401

        info["transformer_engine"] = True
    except ImportError:
        info["transformer_engine"] = False
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        probe = torch.empty(1, device=device, dtype=torch.bfloat16)
        tile = with_env("MONTA_EXPERT_ROW_ALIGNMENT", "tile",
                        lambda: expert_gemm.row_alignment(probe))
        padded_ends = torch.zeros(1, device=device, dtype=torch.int32)
        padded_ends.alignment = tile
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count,
                    # MoNTA's experts' kernels on rows padded to the aligned kernels' tile
                    # (opt-in): "sm90:<rows>[,<weight gradient>]" (else torch); the default's
                    # are per shape (bench_expert_gemm's "default_kernels")
                    expert_row_alignment=expert_gemm.row_alignment(probe),
                    padded_row_alignment=tile,
                    grouped_gemm_padded=expert_gemm._pin(probe, padded_ends) if tile else None)
    else:
        info["device"] = platform.processor() or "cpu"
    info["git_commit"] = source_commit()  # MONTA_GIT_COMMIT when the copy's .git is stale
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/gpu_moe.json"))
    parser.add_argument("--tiny", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--sections", default="peak,expert_gemm,moe_layer,training")
    parser.add_argument("--no-profile", action="store_true")
    opts = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes, tokens = (TINY_SHAPES, 256) if opts.tiny else (SHAPES, 8192)
    out_path = Path(opts.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sections = opts.sections.split(",")
    results = {"environment": environment(device), "tiny": opts.tiny, "shapes": shapes,
               "errors": {}}

    def save():
        out_path.write_text(json.dumps(results, indent=1, default=str) + "\n")

    def run(name, fn):
        started = time.time()
        try:
            results[name] = fn()
        except Exception:  # record and go on: the other sections still mean something
            results["errors"][name] = traceback.format_exc()[-3000:]
            print(f"[{name}] FAILED:\n{results['errors'][name]}", flush=True)
        print(f"[{name}] {time.time() - started:.1f}s", flush=True)
        save()

    timer = Timer(device)
    init_world(device)
    if "peak" in sections:
        run("peak", lambda: bench_peak(device, dtype, timer, opts.tiny))
    if "expert_gemm" in sections:
        run("expert_gemm", lambda: {name: bench_expert_gemm(shape, tokens, device, dtype, timer)
                                    for name, shape in shapes.items()})
    if "moe_layer" in sections:
        from bench.gpu_moe_layer import bench_moe_layer

        run("moe_layer", lambda: {name: bench_moe_layer(shape, tokens, device, dtype, timer,
                                                        not opts.no_profile)
                                  for name, shape in shapes.items()})
    if "training" in sections:
        from bench.gpu_moe_train import bench_training

        torch.cuda.empty_cache() if device.type == "cuda" else None
        peak = results.get("peak", {}).get("tflops")
        run("training", lambda: bench_training(peak, opts.tiny, device.type == "cuda",
                                               out_path.with_suffix(".train.log"),
                                               extra_flags=TRAIN_FUSIONS))
    from bench.gpu_moe_report import render

    import torch.distributed as dist

    dist.destroy_process_group()
    out_path.with_suffix(".md").write_text(render(results))
    print(render(results), flush=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
