"""The experts' kernel settings side by side on one GPU: which grouped GEMMs to run by default.

    python bench/gpu_expert_kernels.py --out bench/results/gpu_expert_kernels.json [--train-rounds 2]

Each setting is a set of environment variables (``MONTA_GROUPED_GEMM``, ``MONTA_FUSED_SWIGLU``,
see ``monta/expert_gemm.py`` and ``monta/swiglu_gemm.py``). Two measures:

* the expert FFN as ``MoNTAGroupedMLP`` runs it (fc1, SwiGLU·prob, fc2), forward + backward, on
  ``--tokens`` routed tokens (8192) at each ``--shapes`` (``train``: the experts of
  ``bench/gpu_moe_train.py``'s model on its 32768 tokens per micro-batch), against the dense
  FFN of the same FLOPs: one pass between two syncs and 4 passes back to back, every setting
  in the same interleaved rounds; the output and all gradients are checked against the first
  setting's;
* with ``--profile``, a torch.profiler summary of each setting's FFN and the dense one, 8 passes
  back to back: the top kernels by GPU time, their sum and the GPU's busy time (so what the
  grouped FFN spends outside its GEMMs shows beside the dense FFN's);
* with ``--train-rounds N``, the training run of ``bench/gpu_moe_train.py`` under each setting,
  in N rotated rounds (iteration ms, MFU against ``--peak``).

``--settings`` names entries of :data:`SETTINGS`; each ``--pin`` adds a ``MONTA_GROUPED_GEMM``
value as a setting of its own (pins hold commas: ``--pin sm90:<rows>,<wgrad>,<input gradient>``;
``--pin-fused-swiglu`` sets ``MONTA_FUSED_SWIGLU`` for them);
each ``--padded ROWS:PIN`` one run on every expert's rows padded to a multiple of ROWS, laid
out as the dispatcher lays them under ``MONTA_EXPERT_ROW_ALIGNMENT=ROWS`` (its outputs and
gradients compared at the real rows). Writes ``--out`` (JSON) and prints a table. Its runs, and those of its
scratch predecessor (same method), are in ``bench/results/gpu_expert_kernels_runs/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_moe import (  # noqa: E402
    PREVIOUS_DEFAULT, SHAPES, environment, init_world, monta_experts, padded_ffn_inputs,
    padded_rows, routed_counts,
)
from bench.gpu_moe_train import bench_training  # noqa: E402
from bench.gpu_timing import (  # noqa: E402
    Timer, rotated, time_interleaved, with_envs, with_grouped_gemm,
)

from monta import expert_gemm, swiglu_gemm  # noqa: E402

PREVIOUS = {"MONTA_GROUPED_GEMM": PREVIOUS_DEFAULT, "MONTA_FUSED_SWIGLU": "fwd"}
PING_PONG = expert_gemm.SM90 + ",".join(expert_gemm.SM90_SMALL_EXPERT_CONFIGS)
SETTINGS = {
    "default": {},
    # until 53fd0bd for every expert size: rows on 128x256 cooperative tiles, weight gradient on
    # torch._grouped_mm, SwiGLU·prob fused into fc1's forward
    "previous": PREVIOUS,
    # the small-expert default for every size, with and without the fused fc1
    "ping_pong": {"MONTA_GROUPED_GEMM": PING_PONG, "MONTA_FUSED_SWIGLU": "0"},
    "ping_pong_fused": {"MONTA_GROUPED_GEMM": PING_PONG, "MONTA_FUSED_SWIGLU": "fwd"},
    # the activation's backward in fc2's input gradient (monta/csrc/sm90_swiglu_dgrad.cuh)
    "ping_pong_bwd": {"MONTA_GROUPED_GEMM": PING_PONG, "MONTA_FUSED_SWIGLU": "bwd"},
    # the default with Triton's fused fc1 wherever the default fuses it, not the sm90 one
    # (monta/csrc/sm90_swiglu_fc1.cuh)
    "triton_fc1": {swiglu_gemm.SM90_FC1_VARIABLE: "0", "MONTA_FUSED_SWIGLU": "fwd"},
    # the large-expert kernels, SwiGLU·prob unfused
    "previous_unfused": {**PREVIOUS, "MONTA_FUSED_SWIGLU": "0"},
}
# the experts of bench/gpu_moe_train.py's model, and its tokens per micro-batch
TRAIN_SHAPE = dict(hidden=2048, ffn=1536, experts=8, topk=2)
TRAIN_TOKENS = 16 * 2048
ROUNDS = 6
PROFILED_PASSES = 8  # back to back under --profile
PROFILED_KERNELS = 25  # kernels listed per setting: all of an expert FFN's


def bench_ffn(shape: dict, tokens: int, settings: dict, device, timer,
              profile: bool = False) -> dict:
    dtype = torch.bfloat16
    h, f, e = shape["hidden"], shape["ffn"], shape["experts"]
    counts = routed_counts(tokens, e, shape["topk"], device)
    n = int(counts.sum())
    gen = torch.Generator(device=device).manual_seed(2)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=gen) * scale).to(dtype)

    x, probs = rand(n, h).requires_grad_(True), torch.rand(n, 1, device=device, generator=gen)
    w1, w2 = rand(e, h, 2 * f, scale=h ** -0.5), rand(e, f, h, scale=f ** -0.5)
    d1 = rand(h, 2 * f, scale=h ** -0.5).requires_grad_(True)
    d2 = rand(f, h, scale=f ** -0.5).requires_grad_(True)
    grad = rand(n, h)
    experts = monta_experts(shape, w1, w2, device, dtype)
    from monta.experts import activation_with_probs

    # settings with MONTA_EXPERT_ROW_ALIGNMENT run on rows padded as the dispatcher pads them
    alignments = {name: padded_alignment(env) for name, env in settings.items()}
    layouts = {None: (x, probs, grad, counts, None)}
    for alignment in alignments.values():
        if alignment not in layouts:
            padded = padded_rows(counts, n, alignment)
            layouts[alignment] = (*padded_ffn_inputs(padded, x, probs, grad), padded[2],
                                  padded[3])

    def step(alignment=None):
        x_in, probs_in, grad_in, counts_in, _ = layouts[alignment]
        y = experts(x_in, counts_in, probs_in.view(-1))[0]
        y.backward(grad_in)
        return y

    def at_real_rows(alignment, t):  # not timed: the layer's combine reads the real rows itself
        real_rows = layouts[alignment][-1]
        return t if real_rows is None else t[real_rows]

    def dense():
        activation_with_probs(x @ d1, probs, F.silu, True).matmul(d2).backward(grad)

    def clear():
        for t in (d1, d2, *experts.parameters(), *(inputs[0] for inputs in layouts.values())):
            t.grad = None

    errors, reference = {}, None
    for name, env in settings.items():
        clear()
        alignment = alignments[name]
        y = with_envs(env, lambda: step(alignment))
        got = [at_real_rows(alignment, y.detach()).float(),
               at_real_rows(alignment, layouts[alignment][0].grad).float(),
               experts.weight1.grad.float(), experts.weight2.grad.float()]
        if reference is None:
            reference = got
        errors[name] = [((a - b).norm() / b.norm()).item() for a, b in zip(got, reference)]
    variants = {name: ("default", lambda env=env, alignment=alignments[name]: with_envs(
        env, lambda: step(alignment))) for name, env in settings.items()}
    variants["dense"] = ("torch", dense)
    out = {"rows": n, "rel_err_vs_first": errors}
    for label, chain, reps in (("one_pass", 1, 3), ("back_to_back", 4, 2)):
        samples, failed = time_interleaved(variants, timer, ROUNDS, reps, setup=clear,
                                           catch=True, chain=chain)
        dense_ms = statistics.median(samples["dense"])
        out[label] = {name: {"ms": statistics.median(t), "fraction_of_dense":
                             dense_ms / statistics.median(t), "samples_ms": t}
                      for name, t in samples.items() if t}
        out[label]["errors"] = failed
    if profile:
        from bench.gpu_moe_layer import profile_summary

        out["profile"] = {name: with_grouped_gemm(pin, lambda fn=fn: profile_summary(
            fn, clear, iters=PROFILED_PASSES, top=PROFILED_KERNELS))
            for name, (pin, fn) in variants.items()}
    return out


def padded_alignment(env: dict) -> int | None:
    """The rows a setting's ``MONTA_EXPERT_ROW_ALIGNMENT`` pads each expert to; None unpadded."""
    return int(env.get("MONTA_EXPERT_ROW_ALIGNMENT", 0)) or None


def bench_train(settings: dict, rounds: int, peak: float, logs: Path) -> dict:
    runs = {name: [] for name in settings}
    logs.mkdir(parents=True, exist_ok=True)
    for round_ in range(rounds):
        for name, env in rotated(list(settings.items()), round_, rounds):
            result = with_envs(env, lambda: bench_training(
                peak, False, True, logs / f"{name}_{round_}.log", profile=False))
            runs[name].append({k: result[k] for k in ("iteration_ms_median", "mfu")})
            print(f"train round {round_} {name}: {result['iteration_ms_median']:.1f} ms",
                  flush=True)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/gpu_expert_kernels.json")
    parser.add_argument("--shapes", default="fine_grained,mixtral,train")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--pin", action="append", default=[],
                        help="a MONTA_GROUPED_GEMM value to add as a setting (repeatable)")
    parser.add_argument("--pin-fused-swiglu", choices=swiglu_gemm.FUSE_CHOICES,
                        help="MONTA_FUSED_SWIGLU for the --pin settings (default: unset, auto, "
                             "which fuses fc1's forward unless the row GEMMs run on the "
                             "small-expert sm90 config)")
    parser.add_argument("--padded", action="append", default=[], metavar="ROWS:PIN",
                        help="a MONTA_GROUPED_GEMM value run on each expert's rows padded to a "
                             "multiple of ROWS (MONTA_EXPERT_ROW_ALIGNMENT), as a setting")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each setting's FFN and the dense one (top kernels)")
    parser.add_argument("--tokens", default="8192",
                        help="routed tokens per FFN, comma-separated (train: its micro-batch); "
                             "results beside 8192's are keyed shape@tokens")
    parser.add_argument("--train-rounds", type=int, default=0)
    parser.add_argument("--peak", type=float, default=788.0,
                        help="dense bf16 TFLOP/s the training MFU is measured against")
    opts = parser.parse_args(argv)
    try:
        token_counts = [int(t) for t in opts.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens takes comma-separated integers, got {opts.tokens!r}")
    if min(token_counts) < 1:
        parser.error("--tokens must be positive")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the settings choose between GPU kernels)")
    unknown = set(opts.settings.split(",")) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    settings = {name: SETTINGS[name] for name in opts.settings.split(",")}
    fused = {"MONTA_FUSED_SWIGLU": opts.pin_fused_swiglu} if opts.pin_fused_swiglu else {}
    settings.update({pin: {"MONTA_GROUPED_GEMM": pin, **fused} for pin in opts.pin})
    for spec in opts.padded:
        rows, _, pin = spec.partition(":")
        if not rows.isdigit() or int(rows) < 1 or not pin:
            parser.error(f"--padded takes ROWS:PIN (e.g. 128:sm90:128x128_pp_c1x2), got {spec!r}")
        settings[f"padded{rows}:{pin}"] = {"MONTA_GROUPED_GEMM": pin,
                                           "MONTA_EXPERT_ROW_ALIGNMENT": rows}
    device = torch.device("cuda")
    init_world(device)
    shapes = {**SHAPES, "train": TRAIN_SHAPE}
    results = {"environment": environment(device), "settings": settings, "ffn": {}}
    timer = Timer(device)
    runs = [(shape, tokens) for shape in opts.shapes.split(",")
            for tokens in ([TRAIN_TOKENS] if shape == "train" else token_counts)]
    for shape, tokens in runs:
        name = shape if shape == "train" or tokens == 8192 else f"{shape}@{tokens}"
        results["ffn"][name] = r = bench_ffn(shapes[shape], tokens, settings, device, timer,
                                             opts.profile)
        for label in ("one_pass", "back_to_back"):
            print(f"{name} {label}: " + ", ".join(
                f"{k} {v['ms']:.2f} ms ({v['fraction_of_dense']:.0%})"
                for k, v in r[label].items() if k != "errors"), flush=True)
        for setting, summary in r.get("profile", {}).items():
            print(f"{name} profile {setting}: kernels {summary['gpu_ms_per_iter']:.3f} ms, "
                  f"busy {summary['gpu_busy_ms_per_iter']:.3f} ms per pass", flush=True)
            for row in summary["top_kernels"]:
                print(f"    {row['ms_per_iter']:7.3f} ms {row['calls_per_iter']:5.1f}x "
                      f"{row['kernel'][:90]}", flush=True)
        opts.out.write_text(json.dumps(results, indent=1) + "\n")
    if opts.train_rounds:
        results["training"] = bench_train(settings, opts.train_rounds, opts.peak,
                                          opts.out.with_suffix(".train_logs"))
        opts.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
