"""What the fused RoPE, cross entropy and Adam buy the GPU training run of ``bench/gpu_moe.py``.

    python bench/gpu_train_fusions.py --out bench/results/gpu_train_fusions.json   # ~4 min, H200

The same ~0.8B GPT-MoE, ``torchrun --nproc-per-node 1 pretrain_moe.py`` (bf16, grouped experts,
mock data, 12 iterations), under four flag sets, each adding one fusion: megatron's unfused
RoPE and cross entropy with torch's multi-tensor Adam (``--no-rope-fusion --no-adam-fusion``),
MoNTA's fused RoPE (monta/rope.py, the default), that plus megatron's
``--cross-entropy-loss-fusion``, and that plus torch's fused Adam (the default on GPUs,
monta/training/optimizer.py's ``fuse_torch_adam``). Each runs ``--rounds`` times in rotated
order (so clock drift favours none); iteration time and tokens/s are the median over every
run's steady iterations' medians, MFU against a dense bf16 peak measured first. Writes the
JSON and a Markdown table next to it.
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

from bench.gpu_moe import bench_peak, environment  # noqa: E402
from bench.gpu_moe_train import bench_training  # noqa: E402
from bench.gpu_timing import Timer, rotated  # noqa: E402

VARIANTS = {  # name: (flags, what it is); each adds one fusion to the one before
    "unfused": (("--no-rope-fusion", "--no-adam-fusion"),
                "megatron's unfused RoPE and cross entropy, torch's multi-tensor Adam"),
    "rope": (("--no-adam-fusion",), "MoNTA's fused RoPE (default)"),
    "rope_ce": (("--no-adam-fusion", "--cross-entropy-loss-fusion"),
                "fused RoPE + `--cross-entropy-loss-fusion`"),
    "rope_ce_adam": (("--cross-entropy-loss-fusion",),
                     "fused RoPE + fused cross entropy + torch's fused Adam (default)"),
}
ITERATIONS = ("--train-iters", "12")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="small model: a smoke run (CPU too)")
    opts = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    peak = bench_peak(device, torch.bfloat16 if on_gpu else torch.float32, Timer(device),
                      opts.tiny)["tflops"]
    runs = {name: [] for name in VARIANTS}
    logs = opts.out.parent / "gpu_train_fusions_logs"
    logs.mkdir(parents=True, exist_ok=True)
    for round_ in range(opts.rounds):
        for name, (flags, _) in rotated(list(VARIANTS.items()), round_, opts.rounds):
            result = bench_training(peak, opts.tiny, on_gpu, logs / f"{name}_{round_}.log",
                                    extra_flags=(*flags, *([] if opts.tiny else ITERATIONS)),
                                    profile=False)
            runs[name].append(result)
            print(f"round {round_} {name}: {result['iteration_ms_median']:.1f} ms", flush=True)
    rows = {}
    for name, (flags, label) in VARIANTS.items():
        results = runs[name]
        rows[name] = {
            "flags": list(flags), "label": label, "command": results[0]["command"],
            "iteration_ms_runs": [r["iteration_ms_median"] for r in results],
            "iteration_ms": statistics.median(r["iteration_ms_median"] for r in results),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "mfu": statistics.median(r["mfu"] for r in results),
            "peak_memory_gib": max(r["peak_memory_gib"] or 0 for r in results),
            "loss_last_runs": [r["loss_first_last"][1] for r in results],
        }
    base = rows["unfused"]["iteration_ms"]
    for row in rows.values():
        row["speedup_vs_unfused"] = base / row["iteration_ms"]
    out = {"environment": environment(device), "tiny": opts.tiny, "peak_tflops": peak,
           "rounds": opts.rounds, "variants": rows}
    opts.out.write_text(json.dumps(out, indent=1))
    lines = [f"Training run of `bench/gpu_moe.py` ({out['environment'].get('device')}, "
             f"{opts.rounds} runs each, rotated; MFU against {peak:.0f} TFLOP/s):", "",
             "| flags | iteration ms (runs) | tokens/s | MFU | speedup | peak GiB | last loss |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows.values():
        runs_ms = ", ".join(f"{v:.0f}" for v in row["iteration_ms_runs"])
        lines.append(f"| {row['label']} | {row['iteration_ms']:.1f} ({runs_ms}) | "
                     f"{row['tokens_per_s']:.0f} | {100 * row['mfu']:.1f} % | "
                     f"{row['speedup_vs_unfused']:.3f}× | {row['peak_memory_gib']} | "
                     + ", ".join(f"{v:.4f}" for v in row["loss_last_runs"]) + " |")
    opts.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
