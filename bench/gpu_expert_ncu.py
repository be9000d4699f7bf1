"""Hardware counters of the experts' grouped GEMMs beside the dense GEMMs of the same shapes.

    python bench/gpu_expert_ncu.py --out bench/results/gpu_expert_ncu.json   # ~1 min, H200 + ncu

Where does the grouped expert FFN lose to the dense one, in counters rather than in milliseconds?
This script runs itself under Nsight Compute (``ncu``, ``--probe``) and profiles, at
``--shape`` (fine-grained by default) and ``--tokens`` routed tokens, each projection's forward,
input gradient and weight gradient: on the grouped kernels MoNTA runs by default, on the routed
rows (``routed``) and on exactly n / E rows per expert (``balanced``: no partly filled tiles),
and the dense cuBLAS GEMM of the same shape (``dense``), every launch in an NVTX range of its
own. ncu locks the clocks to base and replays each kernel per metric pass, so durations here are
comparable to one another, not to the other benches. Per GEMM: its kernel's duration, SM-active
cycles, tensor (GMMA) instructions, SM and L2 throughput, L2 bytes and hit rate, DRAM throughput
and the top warp stall reasons. The tensor instructions count MMA work where the kernels issue
the same instruction shape: routed over balanced is what partly filled tiles add, and against
dense the row GEMMs compare (on the H200 cuBLAS's weight gradients issued another shape, twice
as many instructions for the same FLOPs). Writes the JSON and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_moe import SHAPES, environment, routed_counts  # noqa: E402

RANGE_PREFIX = "gemm:"
METRICS = {
    "duration_ns": "gpu__time_duration.sum",
    "sm_active_cycles": "sm__cycles_active.avg",
    "gmma_instructions": "sm__inst_executed_pipe_tensor_op_gmma.sum",
    "sm_throughput_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_throughput_pct": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_bytes": "lts__t_bytes.sum",
    "l2_hit_rate_pct": "lts__t_sector_hit_rate.pct",
    "dram_throughput_pct": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
}
STALLS = ("long_scoreboard", "barrier", "gmma", "mio_throttle", "wait", "branch_resolving")


def stall_metric(reason: str) -> str:
    return f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio"


def gemms(shape: dict, tokens: int, device) -> dict:
    """{label: launch}: fc1's and fc2's three GEMMs, routed / balanced / dense."""
    from monta import expert_gemm

    dtype = torch.bfloat16
    h, f, e = shape["hidden"], shape["ffn"], shape["experts"]
    counts = routed_counts(tokens, e, shape["topk"], device)
    n = int(counts.sum())
    gen = torch.Generator(device=device).manual_seed(3)
    ends = {"routed": torch.cumsum(counts, 0).to(torch.int32),
            "balanced": torch.cumsum(torch.full_like(counts, n // e), 0).to(torch.int32)}
    launches = {}
    for proj, (k, cols) in {"fc1": (h, 2 * f), "fc2": (f, h)}.items():
        x = torch.randn(n, k, device=device, generator=gen).to(dtype)
        dy = torch.randn(n, cols, device=device, generator=gen).to(dtype)
        w = (torch.randn(e, k, cols, device=device, generator=gen) * k ** -0.5).to(dtype)
        dense_w = w[0]
        for rows, row_ends in ends.items():
            launches[f"{proj}.forward.{rows}"] = (
                lambda x=x, w=w, r=row_ends: expert_gemm.rows(x, w, r))
            launches[f"{proj}.input_grad.{rows}"] = (
                lambda dy=dy, w=w, r=row_ends: expert_gemm.rows(dy, w.transpose(1, 2), r, True))
            launches[f"{proj}.weight_grad.{rows}"] = (
                lambda x=x, dy=dy, w=w, r=row_ends: expert_gemm.wgrad(x, dy, r, w))
        launches[f"{proj}.forward.dense"] = lambda x=x, d=dense_w: x @ d
        launches[f"{proj}.input_grad.dense"] = lambda dy=dy, d=dense_w: dy @ d.t()
        launches[f"{proj}.weight_grad.dense"] = lambda x=x, dy=dy: x.t() @ dy
    return launches


def probe(shape_name: str, tokens: int) -> None:
    """What ncu profiles: every launch twice to warm up (kernel choice, compilation), then each
    once inside its own NVTX range."""
    device = torch.device("cuda")
    launches = gemms(SHAPES[shape_name], tokens, device)
    for _ in range(2):
        for fn in launches.values():
            fn()
    torch.cuda.synchronize()
    for label, fn in launches.items():
        torch.cuda.nvtx.range_push(RANGE_PREFIX + label)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_raw_csv(text: str) -> dict:
    """ncu's ``--page raw --csv`` output → {label: {metric: value}} for the longest kernel in
    each NVTX range (the GEMM; the grouped kernels also launch a tiny one filling their group
    arrays). Lines before the header (ncu's own messages, the program's output) are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no ncu CSV header in the output")
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = rows[0]
    wanted = {**METRICS, **{f"stall_{reason}": stall_metric(reason) for reason in STALLS}}
    columns = {name: header.index(metric) for name, metric in wanted.items() if metric in header}
    kernel_column = header.index("Kernel Name")
    range_column = next(i for i, name in enumerate(header) if "Push/Pop_Range" in name)
    pattern = re.compile(re.escape(RANGE_PREFIX) + r"([\w.]+)")
    out = {}
    for row in rows[1:]:
        if len(row) != len(header):
            continue  # anything truncated
        match = pattern.search(row[range_column])
        if match is None:
            continue  # the units row
        values = {name: _number(row[i]) for name, i in columns.items()}
        values["kernel"] = row[kernel_column]
        label = match.group(1)
        if (values.get("duration_ns") or 0) > (out.get(label, {}).get("duration_ns") or 0):
            out[label] = values
    return out


def summarize(kernels: dict) -> dict:
    """Per projection and GEMM: routed and balanced against dense (the dense kernel's duration
    over this one's, and this one's tensor instructions over dense's)."""
    summary = {}
    for label, values in kernels.items():
        proj, gemm, rows = label.split(".")
        dense = kernels.get(f"{proj}.{gemm}.dense")
        if rows == "dense" or not dense:
            continue
        summary[label] = {
            "fraction_of_dense": dense["duration_ns"] / values["duration_ns"],
            "gmma_over_dense": values["gmma_instructions"] / dense["gmma_instructions"],
        }
    return summary


def table(kernels: dict) -> str:
    head = ("gemm", "µs", "GMMA M", "SM %", "L2 %", "L2 GB", "L2 hit %", "DRAM %",
            "stall: long sb", "barrier", "gmma")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, v in kernels.items():
        def f(key, scale=1.0, digits=1):
            return "" if v.get(key) is None else f"{v[key] / scale:.{digits}f}"
        lines.append("| " + " | ".join((
            label, f("duration_ns", 1e3), f("gmma_instructions", 1e6, 2), f("sm_throughput_pct"),
            f("l2_throughput_pct"), f("l2_bytes", 1e9, 2), f("l2_hit_rate_pct"),
            f("dram_throughput_pct"), f("stall_long_scoreboard", digits=2),
            f("stall_barrier", digits=2), f("stall_gmma", digits=2))) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/gpu_expert_ncu.json")
    parser.add_argument("--shape", default="fine_grained", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ncu", default=os.environ.get("NCU", "ncu"),
                        help="the Nsight Compute CLI (default: ncu on PATH, or $NCU)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.tokens < 1:
        parser.error("--tokens must be positive")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it profiles GPU kernels)")
    if opts.probe:
        probe(opts.shape, opts.tokens)
        return 0
    ncu = shutil.which(opts.ncu)
    if ncu is None:
        parser.error(f"Nsight Compute CLI {opts.ncu!r} not found (pass --ncu PATH, e.g. "
                     "/usr/local/cuda/bin/ncu)")
    metrics = ",".join([*METRICS.values(), *map(stall_metric, STALLS)])
    command = [ncu, "--nvtx", "--nvtx-include", f"regex:{RANGE_PREFIX}.*/", "--metrics", metrics,
               "--csv", "--page", "raw", sys.executable, str(Path(__file__).resolve()),
               "--probe", "--shape", opts.shape, "--tokens", str(opts.tokens)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise SystemExit(f"ncu failed ({run.returncode}):\n{run.stderr[-4000:]}")
    kernels = parse_raw_csv(run.stdout)
    if not kernels:
        raise SystemExit(f"ncu profiled no labelled kernel:\n{run.stdout[-2000:]}"
                         f"\n{run.stderr[-2000:]}")
    device = torch.device("cuda")
    out = {"environment": environment(device), "shape": opts.shape, "tokens": opts.tokens,
           "ncu": ncu, "kernels": kernels, "summary": summarize(kernels)}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(out, indent=1) + "\n")
    print(table(kernels))
    for label, s in out["summary"].items():
        print(f"{label}: {s['fraction_of_dense']:.1%} of dense, "
              f"{s['gmma_over_dense']:.3f}x dense's tensor instructions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
