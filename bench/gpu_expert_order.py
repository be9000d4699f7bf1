"""The one-rank expert-order kernels (monta/dispatch/kernels.py) against an earlier revision's.

    python bench/gpu_expert_order.py --against f58da7f --out bench/results/gpu_expert_order.json

Loads ``monta/dispatch/kernels.py`` as it was at ``--against`` (``git show``, or the copy
``--against-file`` names, on a machine without the history) next to the current one, checks both give the same order on the same inputs, and times each (median of 10
samples of 20 calls back to back, interleaved per shape) for :func:`expert_order` (from a
[T, E] mask) and :func:`topk_softmax_order` (from router logits). Small shapes are bound by the
host's launch time, not the GPU's: read them as such.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAPES = ((8192, 8, 2), (8192, 64, 6), (8192, 256, 8))  # tokens, experts, top-k
CALLS = 20  # per timed sample, back to back


def _kernels_at(rev: str, folder: Path, copy: str | None = None):
    if copy:
        source = Path(copy).read_text()
    else:
        source = subprocess.run(["git", "show", f"{rev}:monta/dispatch/kernels.py"], cwd=REPO,
                                check=True, capture_output=True, text=True).stdout
    path = folder / "kernels_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("kernels_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    from bench.gpu_timing import Timer
    from monta.dispatch import kernels

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="git revision to compare with")
    parser.add_argument("--against-file", help="that revision's kernels.py, if git cannot show it")
    parser.add_argument("--out", default="/tmp/gpu_expert_order.json")
    opts = parser.parse_args(argv)
    rows = []
    timer = Timer(torch.device("cuda"))

    def per_call_us(fn) -> float:  # median of 10 samples of 20 calls back to back
        return timer(fn, warmup=3, reps=10, chain=CALLS)["median_ms"] * 1e3

    with tempfile.TemporaryDirectory() as folder:
        before = _kernels_at(opts.against, Path(folder), opts.against_file)
        for tokens, experts, topk in SHAPES:
            gen = torch.Generator(device="cuda").manual_seed(0)
            logits = torch.randn(tokens, experts, device="cuda", generator=gen)
            mask = torch.zeros(tokens, experts, dtype=torch.bool, device="cuda")
            mask.scatter_(1, logits.topk(topk, 1).indices, True)
            same_order = all(torch.equal(a, b) for a, b in zip(before.expert_order(mask, topk),
                                                                kernels.expert_order(mask, topk)))
            routed = [m.topk_softmax_order(logits, topk) for m in (before, kernels)]
            same_routed = all(torch.equal(a, b) for a, b in zip(*routed))
            row = {"tokens": tokens, "experts": experts, "topk": topk,
                   "same_order": same_order, "same_routed": same_routed}
            for name, module in (("before", before), ("now", kernels)):
                row[f"expert_order_{name}_us"] = per_call_us(
                    lambda m=module: m.expert_order(mask, topk))
                row[f"topk_softmax_order_{name}_us"] = per_call_us(
                    lambda m=module: m.topk_softmax_order(logits, topk))
            rows.append(row)
    result = {"against": opts.against, "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "calls_per_sample": CALLS, "rows": rows}
    Path(opts.out).write_text(json.dumps(result, indent=1))
    print(f"| T, E, k | expert_order µs ({opts.against} → now) | topk_softmax_order µs | same |")
    print("|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['tokens']}, {r['experts']}, {r['topk']} | {r['expert_order_before_us']:.0f} → "
              f"{r['expert_order_now_us']:.0f} | {r['topk_softmax_order_before_us']:.0f} → "
              f"{r['topk_softmax_order_now_us']:.0f} | {r['same_order'] and r['same_routed']} |")
    return 0 if all(r["same_order"] and r["same_routed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
