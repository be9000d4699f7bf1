"""Where MoNTA's MoE layer spends its wall time on one GPU: host latency before the first GEMM.

    python bench/gpu_moe_gaps.py --shape mixtral --out /tmp/gaps.json   # ~30 s on an H200

``bench/gpu_moe.py`` times the layer's forward + backward from an idle GPU, as a layer runs
after a synchronisation; its profile sums kernel time. The difference is time the GPU waits for
the host: with one GPU nothing overlaps the router and the dispatch, so every small launch before
the first expert GEMM (each ~40–70 µs of host time on the H200 machine) delays everything after
it. This script times the step (CUDA events, median), records a ``torch.profiler`` trace of a
few steps and reads from it: when the first expert GEMM starts, the GPU's idle gaps (with the
kernel after each and the operation that launched it: cuda runtime *and* driver launches, so
Triton kernels count), and the host operations before that GEMM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# the grouped expert GEMMs: CUTLASS kernels (torch._grouped_mm's and MoNTA's sm90 library's) or
# MoNTA's Triton ones; per-expert cuBLAS GEMMs are told by the operation that launched them
GEMMS = ("cutlass13device_kernel", "_rows_kernel", "_rows_tma_kernel", "_fc1_swiglu_kernel")
PER_EXPERT_OP = "PerExpertMM"


def is_gemm(kernel: dict, launched_by: str = "") -> bool:
    """A profiled kernel event is one of the experts' GEMMs (``launched_by``: the operations
    that launched it, innermost first)."""
    return any(g in kernel["name"] for g in GEMMS) or PER_EXPERT_OP in launched_by


def _events(trace: Path):
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                      and e.get("args", {}).get("correlation") in launches),
                     key=lambda e: e["ts"])
    return events, launches, kernels


def analyse(trace: Path, label: str = "STEP") -> list[dict]:
    """Per profiled step: front latency, GPU busy/idle, the largest idle gaps, host ops before
    the first expert GEMM was launched."""
    events, launches, kernels = _events(trace)
    steps = sorted((e for e in events if e.get("cat") == "user_annotation"
                    and e["name"] == label), key=lambda e: e["ts"])
    host = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            host[e["tid"]].append(e)

    def launched_by(kernel):
        launch = launches[kernel["args"]["correlation"]]
        inside = sorted((e for e in host[launch["tid"]]
                         if e["ts"] <= launch["ts"] <= e["ts"] + e["dur"] and e["name"] != label),
                        key=lambda e: e["dur"])
        return " < ".join(e["name"][:40] for e in inside[:3])

    out = []
    for step in steps:
        t0, t1 = step["ts"], step["ts"] + step["dur"]
        ks = [k for k in kernels if t0 <= launches[k["args"]["correlation"]]["ts"] <= t1]
        if not ks:
            continue
        end, busy, gaps = ks[0]["ts"], 0.0, []
        for k in ks:
            if k["ts"] > end:
                gaps.append((k["ts"] - end, k["name"][:60], launched_by(k)))
            busy += max(0.0, k["ts"] + k["dur"] - max(end, k["ts"]))
            end = max(end, k["ts"] + k["dur"])
        first_gemm = next(k for k in ks if is_gemm(k, launched_by(k)))
        gemm_launch = launches[first_gemm["args"]["correlation"]]["ts"]
        before = [e for e in host[step["tid"]] if t0 < e["ts"] < gemm_launch
                  and e.get("cat") == "cpu_op"]
        top = [e for e in before if not any(o is not e and o["ts"] <= e["ts"]
                                            and e["ts"] + e["dur"] <= o["ts"] + o["dur"]
                                            for o in before)]
        per_kernel = defaultdict(float)
        for k in ks:
            per_kernel[k["name"][:60]] += k["dur"]
        out.append({"kernel_us": sorted(((round(v, 1), n) for n, v in per_kernel.items()),
                                        reverse=True)[:12],
                    "wall_us": end - t0, "first_gemm_starts_us": first_gemm["ts"] - t0,
                    "gpu_busy_us": busy, "gpu_idle_us": end - t0 - busy, "kernels": len(ks),
                    "host_ops_before_first_gemm": len(top),
                    "top_gaps": [[round(g, 1), name, by] for g, name, by in sorted(gaps)[::-1][:12]],
                    "host_before_first_gemm": [[round(e["ts"] - t0), round(e["dur"]), e["name"][:50]]
                                               for e in top]})
    return out


def main(argv=None) -> int:
    from torch.profiler import ProfilerActivity, profile, record_function

    from bench.gpu_moe import SHAPES, init_world
    from bench.gpu_moe_layer import build_layers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", default="/tmp/gpu_moe_gaps.json")
    parser.add_argument("--chain", type=int, default=1,
                        help="passes per timed step, back to back without a sync (as training "
                             "runs them: the host queues ahead while the GPU computes)")
    parser.add_argument("--keep-trace", action="store_true",
                        help="keep the chrome trace beside --out (.trace.json) to read by hand")
    opts = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    init_world(device)
    shape = SHAPES[opts.shape]
    layer = build_layers(shape, device, dtype)["monta_grouped"]
    torch.cuda.empty_cache()
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(opts.tokens // 2, 2, shape["hidden"], device=device, generator=gen).to(dtype)
    grad = torch.randn(x.shape, device=device, generator=gen).to(dtype)
    inp = x.clone().requires_grad_(True)

    def step():
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with record_function("STEP"):
            for _ in range(opts.chain):
                inp.grad = None
                for p in layer.parameters():
                    p.grad = None
                layer(inp)[0].backward(grad)
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / opts.chain

    for _ in range(3):
        step()
    result = {"shape": opts.shape, "tokens": opts.tokens, "chain": opts.chain,
              "step_ms_median": statistics.median(step() for _ in range(15))}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled = [step() for _ in range(4)]
    trace = Path(opts.out).with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))
    result["profiled_step_ms"] = profiled
    result["steps"] = analyse(trace)[1:]  # the first profiled step pays the profiler's start
    Path(opts.out).write_text(json.dumps(result, indent=1))
    last = result["steps"][-1]
    print(f"{opts.shape}: step {result['step_ms_median']:.2f} ms (profiled "
          f"{statistics.median(profiled):.2f}); first expert GEMM starts at "
          f"{last['first_gemm_starts_us'] / 1e3:.2f} ms after {last['host_ops_before_first_gemm']}"
          f" host ops; GPU idle {last['gpu_idle_us'] / 1e3:.2f} ms of {last['wall_us'] / 1e3:.2f}")
    for kernel in last["kernel_us"][:8]:
        print("  kernel", kernel)
    for gap in last["top_gaps"][:8]:
        print("  gap", gap)
    for op in last["host_before_first_gemm"]:
        print("  host", op)
    if not opts.keep_trace:
        trace.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
