"""A/B of the one-rank MoE layer's routing paths on one GPU: megatron's dense [T, E] routing
map vs MoNTA's routing straight into the expert order (monta/dispatch/routed_order.py).

    python bench/gpu_route_ab.py            # ~1 min on an H200; prints a table

Each variant is the same ``MoNTAMoELayer`` (same weights), timed forward + backward from an idle
GPU in interleaved rounds (as bench/gpu_moe.py times the layer), with megatron's stock layer as
the reference; then one profiled step per variant says when the first expert GEMM starts
(bench/gpu_moe_gaps.py), with the kernels before it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_moe import SHAPES, init_world  # noqa: E402
from bench.gpu_moe_gaps import _events, analyse, is_gemm  # noqa: E402
from bench.gpu_moe_layer import build_layers  # noqa: E402
from bench.gpu_timing import Timer  # noqa: E402


def _profiled(step, steps: int = 4) -> dict:
    """Medians over profiled steps (the first left out): wall, GPU busy, first expert GEMM's
    start (µs), host ops before it; and the last step's kernels before that GEMM (µs)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.cuda.synchronize()
            with record_function("STEP"):
                step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        rows = analyse(trace)[1:]
        _, _, kernels = _events(trace)
    out = {key: statistics.median(r[key] for r in rows)
           for key in ("wall_us", "gpu_busy_us", "first_gemm_starts_us",
                       "host_ops_before_first_gemm")}
    last_gemm = [k for k in kernels if is_gemm(k)][-6]  # the last step's first
    first = [k for k in kernels if k["ts"] < last_gemm["ts"]][-12:]
    out["front_kernels"] = [(k["name"][:28], round(k["dur"])) for k in first]
    return out


def _host_us(fn, calls: int = 100) -> float:
    """Host time per call of ``fn`` (launches only: the GPU is not waited for)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds / calls * 1e6


def host_costs(layer, x) -> dict:
    """Host µs per call of the pieces before the first expert GEMM (no grad)."""
    from monta.dispatch import kernels
    from monta.dispatch.routed_order import route_in_expert_order

    router, k = layer.router, layer.router.topk
    x2d = x.view(-1, x.size(-1))
    rows = torch.zeros(16, dtype=torch.int64, device=x.device)
    with torch.no_grad():
        logits = router.gating(x).view(-1, router.config.num_moe_experts)
        return {"router.gating": _host_us(lambda: router.gating(x)),
                "torch.mm": _host_us(lambda: torch.mm(x2d, router.weight.t())),
                "topk_softmax_order kernel": _host_us(
                    lambda: kernels.topk_softmax_order(logits, k)),
                "route_in_expert_order": _host_us(lambda: route_in_expert_order(logits, k)),
                "empty": _host_us(lambda: torch.empty(8, device=x.device)),
                "index_select": _host_us(lambda: x2d.index_select(0, rows))}


def run_shape(name: str, tokens: int, rounds: int, reps: int) -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape = SHAPES[name]
    layers = build_layers(shape, device, dtype)
    stock, ours = layers["megatron_sequential"], layers["monta_grouped"]
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(tokens // 2, 2, shape["hidden"], device=device, generator=gen).to(dtype)
    grad = torch.randn(x.shape, device=device, generator=gen).to(dtype)
    inp = x.clone().requires_grad_(True)

    def variant(layer, ordered: bool):
        def step():
            layer.router.emit_expert_order = ordered
            out = layer(inp)[0]
            out.backward(grad)
            return out

        def clear():
            inp.grad = None
            for p in layer.parameters():
                p.grad = None
        return step, clear

    variants = {"megatron": variant(stock, False), "monta dense map": variant(ours, False),
                "monta in order": variant(ours, True)}
    results = {}
    for label, (step, clear) in variants.items():
        clear()
        out = step().detach().float()
        results[label] = {"out": out, "grad": inp.grad.float().clone(), "ms": []}
    timer = Timer(device)
    for _ in range(rounds):
        for label, (step, clear) in variants.items():
            results[label]["ms"] += timer(step, warmup=2, reps=reps, setup=clear)["samples_ms"]
    ref, dense = results["megatron"], results["monta dense map"]
    base = statistics.median(ref["ms"])
    print(f"\n{name}, {tokens} tokens: variant | median ms | min | speedup | profiled: wall, "
          f"GPU busy, first GEMM us (host ops before) | out err vs megatron | vs dense map | "
          f"grad err vs dense map")
    fronts = {}
    for label, (step, clear) in variants.items():
        row = results[label]
        med = statistics.median(row["ms"])
        clear()
        prof = _profiled(step) if label != "megatron" else {}
        fronts[label] = prof.get("front_kernels")

        def err(a, b):
            return ((a - b).norm() / b.norm()).item()

        print(f"  {label:24s} | {med:6.2f} | {min(row['ms']):6.2f} | {base / med:5.3f}x | "
              f"{prof.get('wall_us', 0):6.0f} {prof.get('gpu_busy_us', 0):6.0f} "
              f"{prof.get('first_gemm_starts_us', 0):5.0f} "
              f"({prof.get('host_ops_before_first_gemm', 0):2.0f}) | "
              f"{err(row['out'], ref['out']):.1e} | {err(row['out'], dense['out']):.1e} | "
              f"{err(row['grad'], dense['grad']):.1e}", flush=True)
    for label, kernels in fronts.items():
        if kernels:
            print(f"  {label}: kernels before the first GEMM (us):", kernels)
    print("  host us per call:", {k: round(v) for k, v in host_costs(ours, x).items()})
    del layers, variants, results
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="mixtral,fine_grained")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=7)
    opts = parser.parse_args(argv)
    init_world(torch.device("cuda"))
    for name in opts.shapes.split(","):
        run_shape(name, opts.tokens, opts.rounds, opts.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
