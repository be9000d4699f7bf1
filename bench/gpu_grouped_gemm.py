"""Grouped-GEMM kernels for the experts, side by side on one GPU: which to run, and which layout.

For each of an expert projection's three GEMMs (forward ``x·W``, input gradient ``dy·Wᵀ``,
weight gradient ``xᵀ·dy`` per expert), at Mixtral and fine-grained shapes with 8192 routed
tokens, it times:

* ``torch._grouped_mm`` (CUTLASS on Hopper) with the weight stored ``[E, K, N]`` ("row",
  megatron's ``GroupedMLP`` layout) and ``[E, N, K]`` ("col", ``nn.Linear``'s per expert);
* MoNTA's CUTLASS library (:mod:`monta.sm90_gemm`, when ``make sm90-kernels`` has built it),
  every config, all three GEMMs, both layouts;
* MoNTA's Triton kernels (:mod:`monta.grouped_gemm`), pointer loads and TMA loads, over a few
  tile configs, both layouts (``--kernels`` without ``triton`` skips them);
* ``torch._grouped_mm`` steered to its 64×128 ping-pong kernel (each expert split into empty
  sub-groups sharing its weights; forward and input gradient only);
* the dense GEMM of the same shape (the reference the issue's "% of dense" uses);
* fc1's forward with the same row count for every expert, around the routed mean
  (``uniform_rows_fc1_fwd``: how the CUTLASS kernel's time steps with the rows per expert);

then the whole expert FFN (fc1, SwiGLU·prob, fc2) forward + backward in interleaved rounds:
dense, ``torch._grouped_mm`` only, each GEMM on the kernel :mod:`monta.expert_gemm` tunes for
it, each sm90 config for the row GEMMs, and the default row config with each sm90
weight-gradient config. Every single-GEMM result is checked against ``torch._grouped_mm``'s
before it is timed.

    python bench/gpu_grouped_gemm.py --out bench/results/gpu_grouped_gemm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_moe import (  # noqa: E402
    SHAPES, TINY_SHAPES, environment, padded_ffn_inputs, padded_like, padded_rows, routed_counts,
)
from bench.gpu_timing import Timer, tflops, time_interleaved  # noqa: E402

ROWS_CONFIGS = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
                (64, 256, 64, 4, 8), (64, 128, 64, 4, 4)]
WGRAD_CONFIGS = [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (128, 128, 64, 3, 4),
                 (64, 128, 64, 4, 4)]


def _weights(e, k, n, layout, gen, device):
    """[E, K, N] weights stored as ``layout`` ("row": [E, K, N]; "col": [E, N, K])."""
    if layout == "row":
        return (torch.randn(e, k, n, device=device, generator=gen) * k ** -0.5).bfloat16()
    return (torch.randn(e, n, k, device=device, generator=gen) * k ** -0.5).bfloat16() \
        .transpose(1, 2)


def _torch_ops(w):
    def wgrad(x, dy, ends):
        if w.stride(2) == 1:
            return torch._grouped_mm(x.t(), dy, offs=ends)
        return torch._grouped_mm(dy.t(), x, offs=ends).transpose(1, 2)
    return {"fwd": lambda x, dy, ends: torch._grouped_mm(x, w, offs=ends),
            "dgrad": lambda x, dy, ends: torch._grouped_mm(dy, w.transpose(1, 2), offs=ends),
            "wgrad": wgrad}


def _small_tile_groups(b, ends, rows):
    """``b`` [E, K, N] and its row ends re-expressed as (E-1)·s+1 groups (group s·e is expert e,
    the s-1 after it are empty and point into its weights), so that ``torch._grouped_mm``'s
    heuristic (mean rows per group <= 128) picks its 64×128 ping-pong kernel instead of the
    128×256 cooperative one. Same products, another kernel."""
    experts, k, n = b.shape
    split = 1
    while rows / ((experts - 1) * split + 1) > 128 or (k * n) % (8 * split):
        split += 1
    groups = (experts - 1) * split + 1
    view = torch.as_strided(b, (groups, k, n), (b.stride(0) // split, b.stride(1), b.stride(2)),
                            b.storage_offset())
    return view, ends.repeat_interleave(split)[:groups]


def _torch_small_tile_ops(w, rows):
    def rows_op(a, b, ends):
        view, offs = _small_tile_groups(b, ends, rows)
        return torch._grouped_mm(a, view, offs=offs)
    return {"fwd": lambda x, dy, ends: rows_op(x, w, ends),
            "dgrad": lambda x, dy, ends: rows_op(dy, w.transpose(1, 2), ends)}


def _sm90_ops(w, config):
    from monta import sm90_gemm

    return {"fwd": lambda x, dy, ends: sm90_gemm.rows(x, w, ends, config),
            "dgrad": lambda x, dy, ends: sm90_gemm.rows(dy, w.transpose(1, 2), ends, config),
            "wgrad": lambda x, dy, ends: sm90_gemm.wgrad(x, dy, ends, config, w)}


def _sm90_configs(t, aligned: bool = False) -> list:
    """The sm90 configs built (with ``aligned``: with tile-aligned instances) when ``t`` is on a
    Hopper; none elsewhere."""
    from monta import sm90_gemm

    return list(sm90_gemm.built_configs(aligned)) if sm90_gemm.available(t) else []


def _triton_ops(w, tma, rows_cfg, wgrad_cfg):
    from monta import grouped_gemm as gg

    rows = gg.rows_mm_tma if tma else gg.rows_mm
    wgrad = gg.wgrad_mm_tma if tma else gg.wgrad_mm
    return {"fwd": lambda x, dy, ends: rows(x, w, ends, rows_cfg),
            "dgrad": lambda x, dy, ends: rows(dy, w.transpose(1, 2), ends, rows_cfg),
            "wgrad": lambda x, dy, ends: wgrad(x, dy, ends, torch.empty_strided(
                w.shape, w.stride(), device=w.device, dtype=w.dtype), wgrad_cfg)}


def _rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def _aligned_ops(x, w, dy, counts, config):
    """The three GEMMs of ``config``'s tile-aligned kernels on the rows padded as MoNTA's
    dispatcher pads them (bench.gpu_moe.padded_rows; the gradient's pad rows are zero, as the
    zero probability makes them), each with the view that compares it with torch's result."""
    from monta import sm90_gemm

    padded = padded_rows(counts, x.size(0), sm90_gemm.row_alignment(config))
    positions, ends = padded[3], padded[2].row_ends
    xp, dyp = padded_like(padded, x), padded_like(padded, dy, pads=0)
    real = lambda t: t[positions]  # noqa: E731
    ops = {"fwd": (lambda: sm90_gemm.rows(xp, w, ends, config, aligned=True), real),
           "dgrad": (lambda: sm90_gemm.rows(dyp, w.transpose(1, 2), ends, config, aligned=True),
                     real)}
    if sm90_gemm.aligned_wgrad_built(config):
        ops["wgrad"] = (lambda: sm90_gemm.wgrad(xp, dyp, ends, config, w, aligned=True),
                        lambda t: t)
    return ops


def bench_projection(x, w, dy, ends, timer, flops, kernels, counts=None) -> dict:
    """Every implementation of the three GEMMs for one weight layout; with ``counts``, also
    the tile-aligned kernels on padded rows (FLOPs of the real rows)."""
    reference = {op: fn(x, dy, ends) for op, fn in _torch_ops(w).items()}
    result = {}
    for config in _sm90_configs(x, aligned=True) if counts is not None else ():
        for op, (fn, real) in _aligned_ops(x, w, dy, counts, config).items():
            row = {"rel_err": _rel_err(real(fn()), reference[op])}
            if row["rel_err"] > 2e-2:
                row["error"] = "wrong result"
            else:
                t = timer(fn, warmup=3, reps=10)
                row.update(ms=t["median_ms"], tflops=tflops(flops, t["median_ms"]))
            result.setdefault(op, {})[f"sm90 aligned {config}"] = row
    candidates = [("torch", None, _torch_ops(w)),
                   ("torch 64x128 tiles", None, _torch_small_tile_ops(w, x.size(0)))]
    candidates += [(f"sm90 {config}", None, _sm90_ops(w, config)) for config in _sm90_configs(x)]
    for tma in (False, True) if "triton" in kernels else ():
        for cfg in ROWS_CONFIGS:
            candidates.append((f"triton{'_tma' if tma else ''} {cfg}", ("rows", tma, cfg),
                               _triton_ops(w, tma, cfg, WGRAD_CONFIGS[0])))
        for cfg in WGRAD_CONFIGS:
            candidates.append((f"triton{'_tma' if tma else ''} {cfg}", ("wgrad", tma, cfg),
                               _triton_ops(w, tma, ROWS_CONFIGS[0], cfg)))
    for name, kind, ops in candidates:
        for op, fn in ops.items():
            if kind is not None and (kind[0] == "wgrad") != (op == "wgrad"):
                continue
            row = {}
            try:
                got = fn(x, dy, ends)
                row["rel_err"] = _rel_err(got, reference[op])
                if row["rel_err"] > 2e-2:
                    row["error"] = "wrong result"
                else:
                    t = timer(lambda: fn(x, dy, ends), warmup=3, reps=10)
                    row.update(ms=t["median_ms"], tflops=tflops(flops, t["median_ms"]))
            except Exception as error:  # e.g. a config that does not fit shared memory
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            result.setdefault(op, {})[name] = row
    return result


def bench_shape(shape: dict, tokens: int, device, timer, kernels=("triton", "ffn"),
                ffn_rounds: int = 4) -> dict:
    h, f, e, k = shape["hidden"], shape["ffn"], shape["experts"], shape["topk"]
    counts = routed_counts(tokens, e, k, device)
    n = int(counts.sum())
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    even = torch.cumsum(torch.full_like(counts, n // e), 0, dtype=torch.int32)
    gen = torch.Generator(device=device).manual_seed(2)
    out = {"rows": n, "projections": {}}
    for proj, (kk, nn) in {"fc1": (h, 2 * f), "fc2": (f, h)}.items():
        x = torch.randn(n, kk, device=device, generator=gen).bfloat16()
        dy = torch.randn(n, nn, device=device, generator=gen).bfloat16()
        dense_w = (torch.randn(kk, nn, device=device, generator=gen) * kk ** -0.5).bfloat16()
        flops = 2 * n * kk * nn
        dense = {"fwd": lambda: x @ dense_w, "dgrad": lambda: dy @ dense_w.t(),
                 "wgrad": lambda: x.t() @ dy}
        row = {"K": kk, "N": nn, "dense": {}}
        for op, fn in dense.items():
            t = timer(fn, warmup=3, reps=10)
            row["dense"][op] = {"ms": t["median_ms"], "tflops": tflops(flops, t["median_ms"])}
        for layout in ("row", "col"):
            w = _weights(e, kk, nn, layout, gen, device)
            row[layout] = bench_projection(x, w, dy, ends, timer, flops, kernels, counts)
            t = timer(lambda: torch._grouped_mm(x, w, offs=even), warmup=3, reps=10)
            row[layout]["fwd_balanced_torch"] = tflops(flops, t["median_ms"])
        out["projections"][proj] = row
        print(json.dumps(_best(row), indent=None), flush=True)
    out["uniform_rows_fc1_fwd"] = bench_uniform_rows(shape, device, timer)
    if "ffn" in kernels:
        out["ffn_fwd_bwd"] = bench_ffn(shape, n, ends, device, timer, rounds=ffn_rounds,
                                       counts=counts)
        print(json.dumps({k: v.get("fraction_of_dense") for k, v in out["ffn_fwd_bwd"].items()
                          if isinstance(v, dict) and k != "tuned_choices"}), flush=True)
    return out


def bench_uniform_rows(shape, device, timer) -> dict:
    """fc1's forward with the same row count for every expert, over counts around the mean of
    8192 tokens' routing: how ``torch._grouped_mm``'s time steps with the row count (its tiles
    are 128 rows in clusters of two), and each sm90 config's."""
    from monta import sm90_gemm

    h, f, e = shape["hidden"], shape["ffn"], shape["experts"]
    gen = torch.Generator(device=device).manual_seed(5)
    w = (torch.randn(e, h, 2 * f, device=device, generator=gen) * h ** -0.5).bfloat16()
    mean = 128 * round(8192 * shape["topk"] / e / 128)
    out = {}
    for rows in sorted({mean - 64, mean, mean + 1, mean + 64, mean + 128, mean + 256}):
        x = torch.randn(rows * e, h, device=device, generator=gen).bfloat16()
        ends = torch.cumsum(torch.full((e,), rows, device=device), 0, dtype=torch.int32)
        kernels = {"torch": lambda: torch._grouped_mm(x, w, offs=ends)}
        kernels.update({f"sm90 {c}": (lambda c=c: sm90_gemm.rows(x, w, ends, c))
                        for c in _sm90_configs(x)})
        for name, fn in kernels.items():
            t = timer(fn, warmup=3, reps=10)
            out.setdefault(name, {})[rows] = {
                "ms": t["median_ms"], "tflops": tflops(2 * rows * e * h * 2 * f, t["median_ms"])}
    return out


def bench_ffn(shape, n, ends, device, timer, rounds: int = 4, reps: int = 5,
              counts=None) -> dict:
    """fc1 → SwiGLU·prob → fc2, forward + backward, per implementation and layout, in
    ``rounds`` interleaved rounds of ``reps`` (median of all); with ``counts``, also each
    tile-aligned config on the rows padded as MoNTA's dispatcher pads them."""
    from monta import expert_gemm, sm90_gemm
    from monta.experts import activation_with_probs

    h, f, e = shape["hidden"], shape["ffn"], shape["experts"]
    gen = torch.Generator(device=device).manual_seed(4)
    x = torch.randn(n, h, device=device, generator=gen).bfloat16().requires_grad_(True)
    probs = torch.rand(n, 1, device=device, generator=gen)
    grad = torch.randn(n, h, device=device, generator=gen).bfloat16()
    flops = 3 * 2 * n * (h * 2 * f + f * h)
    weights = {layout: [_weights(e, h, 2 * f, layout, gen, device).requires_grad_(True),
                        _weights(e, f, h, layout, gen, device).requires_grad_(True)]
               for layout in ("row", "col")}
    dense = [(torch.randn(h, 2 * f, device=device, generator=gen) * h ** -0.5).bfloat16()
             .requires_grad_(True),
             (torch.randn(f, h, device=device, generator=gen) * f ** -0.5).bfloat16()
             .requires_grad_(True)]

    def ffn(mm1, mm2, x=x, probs=probs, grad=grad):
        def run():
            a = activation_with_probs(mm1(x), probs, F.silu, True)
            mm2(a).backward(grad)
        return run

    variants = {"dense": ("torch", ffn(lambda t: t @ dense[0], lambda t: t @ dense[1]))}
    # torch._grouped_mm only; each GEMM's tuned choice; each sm90 config for the row GEMMs (the
    # weight gradient on torch), then the default row config with each sm90 weight-gradient one
    configs = _sm90_configs(x)
    pins = ["torch", "auto", *(expert_gemm.SM90 + c for c in configs)]
    default_rows = expert_gemm.SM90_SMALL_EXPERT_CONFIGS[0]
    if default_rows in configs:
        pins += [f"{expert_gemm.SM90}{default_rows},{c}" for c in configs]
    for layout, (w1, w2) in weights.items():
        for pin in pins:
            variants[f"{pin} {layout}"] = (pin, ffn(
                lambda t, w=w1: expert_gemm.grouped_mm(t, w, ends),
                lambda t, w=w2: expert_gemm.grouped_mm(t, w, ends)))

    padded_x = []
    for config in _sm90_configs(x, aligned=True) if counts is not None else ():
        padded = padded_rows(counts, n, sm90_gemm.row_alignment(config))
        xp, pp, gp = padded_ffn_inputs(padded, x, probs, grad)
        padded_x.append(xp)
        # its own weight gradient if it has one, else the default aligned one
        wgrad = config if sm90_gemm.aligned_wgrad_built(config) else \
            expert_gemm.SM90_ALIGNED_CONFIGS[1]
        for layout, (w1, w2) in weights.items():
            pin = f"{expert_gemm.SM90}{config},{wgrad}"
            variants[f"aligned {config} {layout}"] = (pin, ffn(
                lambda t, w=w1, e=padded[2].row_ends: expert_gemm.grouped_mm(t, w, e),
                lambda t, w=w2, e=padded[2].row_ends: expert_gemm.grouped_mm(t, w, e),
                xp, pp, gp))

    def clear():
        for t in [x, *padded_x, *dense, *weights["row"], *weights["col"]]:
            t.grad = None

    samples, errors = time_interleaved(variants, timer, rounds, reps, setup=clear, catch=True)
    out = {name: {"error": error} for name, error in errors.items()}
    for name, times in samples.items():
        if times and name not in out:
            ms = statistics.median(times)
            out[name] = {"ms": ms, "tflops": tflops(flops, ms), "samples_ms": times}
    out["tuned_choices"] = {str(k): str(v) for k, v in expert_gemm.choices().items()}
    for row in out.values():
        if "tflops" in row:
            row["fraction_of_dense"] = row["tflops"] / out["dense"]["tflops"]
    return out


def _best(row) -> dict:
    """Fastest implementation per layout and GEMM, as % of the dense GEMM of the same shape."""
    best = {}
    for layout in ("row", "col"):
        for op in ("fwd", "dgrad", "wgrad"):
            timed = {name: r["tflops"] for name, r in row[layout][op].items() if "tflops" in r}
            name = max(timed, key=timed.get)
            best[f"{layout} {op}"] = (name, round(timed[name] / row["dense"][op]["tflops"], 3),
                                      round(timed.get("torch", 0) / row["dense"][op]["tflops"], 3))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/gpu_grouped_gemm.json"))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tiny", action="store_true",
                        help="small shapes on CPU under TRITON_INTERPRET=1: a smoke run")
    parser.add_argument("--kernels", default="triton,ffn",
                        help="what to time besides torch and the sm90 library (when built): "
                             "'triton' kernels, the whole 'ffn'; comma-separated, may be empty")
    parser.add_argument("--ffn-rounds", type=int, default=4,
                        help="interleaved rounds of the expert-FFN variants")
    opts = parser.parse_args(argv)
    device = torch.device("cpu" if opts.tiny else "cuda")
    shapes, tokens = (TINY_SHAPES, 64) if opts.tiny else (SHAPES, 8192)
    timer = Timer(device)
    results = {"environment": environment(device), "rows_configs": ROWS_CONFIGS,
               "wgrad_configs": WGRAD_CONFIGS, "shapes": {}}
    for name in opts.shapes.split(","):
        started = time.time()
        results["shapes"][name] = bench_shape(shapes[name], tokens, device, timer,
                                              opts.kernels.split(","), opts.ffn_rounds)
        print(f"[{name}] {time.time() - started:.0f}s", flush=True)
        Path(opts.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
