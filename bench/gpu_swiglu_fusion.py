"""SwiGLU·prob fused into the expert GEMMs (monta/swiglu_gemm.py) against the unfused path, per
pass and for the whole expert FFN, back to back.

    python bench/gpu_swiglu_fusion.py --out bench/results/gpu_swiglu_fusion.json   # ~30 s, H200

At the Mixtral and fine-grained shapes of ``bench/gpu_moe.py`` (8192 tokens, routed top-k by
random logits), each variant timed as the median of ``--rounds`` interleaved samples of
``CHAIN`` calls back to back (``bench/gpu_timing.time_interleaved``, as ``bench/gpu_moe.py``
times its variants): fc1 + the activation's forward (fused: one Triton GEMM; unfused:
the experts' default GEMM, then :mod:`monta.swiglu`'s kernel), fc2's input gradient + the
activation's backward (likewise, and with the sm90 library built also in the epilogue of its
kernel, ``dgrad_fused_sm90``), and the FFN forward + backward under ``MONTA_FUSED_SWIGLU`` ``0``,
``fwd``, ``all`` and (sm90) ``bwd``. The gradients of x, the probabilities and both weights
under the fused settings are compared with the unfused ones (relative error).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CHAIN = 4


def bench_shape(shape: dict, rounds: int, device) -> dict:
    from bench.gpu_moe import routed_counts
    from bench.gpu_timing import Timer, time_interleaved
    from monta import expert_gemm, sm90_gemm, swiglu, swiglu_gemm
    from monta.experts import activation_with_probs, expert_offsets, grouped_mm

    h, f, e, k = shape["hidden"], shape["ffn"], shape["experts"], shape["topk"]
    counts = routed_counts(8192, e, k, device)
    n, ends = int(counts.sum()), expert_offsets(counts, device)
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(n, h, device=device, generator=gen).bfloat16().requires_grad_(True)
    probs = torch.rand(n, 1, device=device, generator=gen).requires_grad_(True)
    w1 = (torch.randn(e, h, 2 * f, device=device, generator=gen) * h ** -0.5).bfloat16()
    w2 = (torch.randn(e, f, h, device=device, generator=gen) * f ** -0.5).bfloat16()
    w1.requires_grad_(True)
    w2.requires_grad_(True)
    grad = torch.randn(n, h, device=device, generator=gen).bfloat16()

    def ffn(fused):
        def run():
            if fused == "0":
                a = activation_with_probs(grouped_mm(x, w1, counts, ends), probs, F.silu, True)
                out = grouped_mm(a, w2, counts, ends)
            else:
                out = swiglu_gemm.swiglu_expert_ffn(x, w1, w2, probs, ends, passes=fused)
            out.backward(grad)
        return run

    def clear():
        for t in (x, probs, w1, w2):
            t.grad = None

    # bwd: the activation's backward in the epilogue of the sm90 library's fc2 input gradient
    sm90 = swiglu_gemm.supported(x, w1, w2, "bwd")
    settings = ("0", "fwd", "all", "bwd") if sm90 else ("0", "fwd", "all")
    grads = {}
    for fused in settings:
        clear()
        ffn(fused)()
        grads[fused] = [t.grad.float().clone() for t in (x, probs, w1, w2)]
    errors = {fused: [((a - b).norm() / b.norm()).item() for a, b in zip(grads[fused], grads["0"])]
              for fused in settings[1:]}
    xd, pd, w1d, w2d = x.detach(), probs.detach(), w1.detach(), w2.detach()
    h_out = expert_gemm.rows(xd, w1d, ends)
    variants = {
        "ffn_unfused": ffn("0"), "ffn_fwd": ffn("fwd"), "ffn_all": ffn("all"),
        "fc1_unfused": lambda: activation_with_probs(expert_gemm.rows(xd, w1d, ends), pd,
                                                     F.silu, True),
        "fc1_fused": lambda: swiglu_gemm.fc1_swiglu(xd, w1d, pd, ends),
        "dgrad_unfused": lambda: swiglu.weighted_swiglu_backward(
            h_out, pd, expert_gemm.rows(grad, w2d.transpose(1, 2), ends)),
        "dgrad_fused": lambda: swiglu_gemm.fc2_dgrad_swiglu(grad, w2d, h_out, pd, ends),
    }
    if sm90:
        variants["ffn_bwd"] = ffn("bwd")
        variants["dgrad_fused_sm90"] = lambda: sm90_gemm.swiglu_dgrad(
            grad, w2d, h_out, pd, ends, swiglu_gemm.sm90_dgrad_config(w2d.size(1)))
    samples, _ = time_interleaved({name: ("default", fn) for name, fn in variants.items()},
                                  Timer(device), rounds, reps=1, setup=clear, chain=CHAIN)
    return {"rel_err_vs_unfused [x, probs, w1, w2]": errors,
            "median_ms": {name: round(statistics.median(t), 3) for name, t in samples.items()}}


def main(argv=None) -> int:
    from bench.gpu_moe import SHAPES, environment, init_world

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/gpu_swiglu_fusion.json")
    parser.add_argument("--rounds", type=int, default=10)
    opts = parser.parse_args(argv)
    device = torch.device("cuda")
    init_world(device)
    result = {"environment": environment(device), "chain": CHAIN, "rounds": opts.rounds,
              "shapes": {name: bench_shape(shape, opts.rounds, device)
                         for name, shape in SHAPES.items()}}
    Path(opts.out).write_text(json.dumps(result, indent=1))
    for name, row in result["shapes"].items():
        print(name, json.dumps(row["median_ms"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
