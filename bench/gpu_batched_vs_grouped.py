"""What a pointer-array grouped GEMM pays for its per-expert TMA descriptors, on one GPU.

    python bench/gpu_batched_vs_grouped.py --out bench/results/gpu_batched_vs_grouped.json

Every expert gets the same rows (768 at fine-grained shapes, 2048 at Mixtral's: 8192 tokens'
mean), so ``torch.bmm`` (one 3-D descriptor per operand) can run the same products as
``torch._grouped_mm`` (one descriptor per expert, rewritten when a CTA moves to another
expert's tile) and MoNTA's sm90 configs; a dense GEMM of the same shape is the ceiling. The
forward [E·rows, K] × [E, K, N] and the weight gradient [K, E·rows] × [E·rows, N] by expert,
timed in interleaved rounds (TFLOP/s, median). monta/csrc/sm90_aligned_gemm.cuh is what
MoNTA built on the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_moe import environment  # noqa: E402
from bench.gpu_timing import Timer, tflops  # noqa: E402

PROBLEMS = {"fine_grained_fc1": (64, 768, 2048, 2816), "fine_grained_fc2": (64, 768, 1408, 2048),
            "mixtral_fc1": (8, 2048, 4096, 28672), "mixtral_fc2": (8, 2048, 14336, 4096)}


def bench_problem(experts, rows, k, n, timer, rounds: int) -> dict:
    from monta import sm90_gemm

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(experts * rows, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(experts, k, n, device="cuda", generator=gen) * k ** -0.5).bfloat16()
    dy = torch.randn(experts * rows, n, device="cuda", generator=gen).bfloat16()
    ends = torch.arange(1, experts + 1, device="cuda", dtype=torch.int32) * rows
    dense_w, x3, dy3 = w[0].contiguous(), x.view(experts, rows, k), dy.view(experts, rows, n)
    variants = {
        "dense_fwd": lambda: torch.mm(x, dense_w),
        "bmm_fwd": lambda: torch.bmm(x3, w),
        "grouped_fwd": lambda: torch._grouped_mm(x, w, offs=ends),
        "dense_wgrad": lambda: torch.mm(x.t(), dy),
        "bmm_wgrad": lambda: torch.bmm(x3.transpose(1, 2), dy3),
        "grouped_wgrad": lambda: torch._grouped_mm(x.t(), dy, offs=ends),
    }
    if sm90_gemm.available(x):
        for config in sm90_gemm.built_configs():
            variants[f"sm90 {config}_fwd"] = (
                lambda c=config: sm90_gemm.rows(x, w, ends, c))
    samples = {name: [] for name in variants}
    for round_ in range(rounds):
        for name, fn in variants.items():
            samples[name] += timer(fn, warmup=3 if round_ == 0 else 1, reps=5)["samples_ms"]
    flops = 2 * experts * rows * k * n
    return {name: {"ms": statistics.median(t), "tflops": tflops(flops, statistics.median(t))}
            for name, t in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/gpu_batched_vs_grouped.json"))
    parser.add_argument("--rounds", type=int, default=4)
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    timer = Timer(torch.device("cuda"))
    results = {"environment": environment(torch.device("cuda")), "problems": {}}
    for name, (experts, rows, k, n) in PROBLEMS.items():
        row = bench_problem(experts, rows, k, n, timer, opts.rounds)
        results["problems"][name] = {"experts": experts, "rows_per_expert": rows, "K": k,
                                     "N": n, "tflops": row}
        print(name, " ".join(f"{v}={r['tflops']:.0f}" for v, r in row.items()), flush=True)
    Path(opts.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
