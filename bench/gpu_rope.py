"""MoNTA's fused RoPE (monta/rope.py) against megatron's unfused RoPE, per call, on a GPU.

    python bench/gpu_rope.py --out bench/results/gpu_rope.json   # ~20 s on an H200

The shapes of ``bench/gpu_moe.py``'s training run: 2048 positions × micro-batch 16, 16 query
heads and 4 key groups of head dim 128, query as megatron's attention hands it over (a view of
the fused QKV output), key likewise; forward and backward (the backward's input is a contiguous
gradient). Each variant is timed in interleaved rounds (rotated order), 20 calls back to back
per sample; GB/s counts one read and one write of the tensor, the least any RoPE moves.
Writes the JSON and a Markdown table next to it.
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
from bench.gpu_timing import Timer, rotated  # noqa: E402


def angles(positions: int, rot_dim: int, device) -> torch.Tensor:
    """megatron's RotaryEmbedding layout: [s, 1, 1, R] fp32, the R/2 angles twice."""
    inv = 1.0 / 10000 ** (torch.arange(0, rot_dim, 2, device=device).float() / rot_dim)
    a = torch.outer(torch.arange(positions, device=device).float(), inv)
    return torch.cat((a, a), dim=-1)[:, None, None, :]


def main(argv=None) -> int:
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from monta import rope

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    heads, groups, dim = 16, 4, 128
    per_group = heads // groups
    # megatron's fused QKV output for GQA: [s, b, groups, (heads/groups + 2) · dim]; its query
    # reshape copies (the heads of a group are not evenly strided across groups), key is a view
    qkv = torch.randn(opts.positions, opts.batch, groups, (per_group + 2) * dim,
                      device=device).to(dtype)
    query = qkv[..., :per_group * dim].reshape(opts.positions, opts.batch, heads, dim)
    key = qkv[..., per_group * dim:(per_group + 1) * dim]  # [s, b, groups, dim], strided
    freqs = angles(opts.positions, dim, device)
    timer, rows = Timer(device), {}
    for name, t in (("query", query), ("key", key)):
        grad = torch.randn(t.shape, device=device).to(dtype)
        for direction in ("forward", "backward"):
            x = grad if direction == "backward" else t
            variants = {
                "monta": lambda x=x, d=direction: rope._rotate(x, freqs, d == "backward"),
                # megatron's backward is autograd through the same ops: time it as such
                "megatron": (lambda x=x: _apply_rotary_pos_emb_bshd(x, freqs)) if direction
                == "forward" else _megatron_backward(_apply_rotary_pos_emb_bshd, t, freqs, grad),
            }
            samples = {v: [] for v in variants}
            for round_ in range(opts.rounds):
                for variant, fn in rotated(list(variants.items()), round_, opts.rounds):
                    samples[variant] += timer(fn, warmup=2, reps=3, chain=20)["samples_ms"]
            moved = 2 * t.numel() * t.element_size()
            row = rows[f"{name} {direction}"] = {"shape": list(t.shape),
                                                 "strides": list(t.stride())}
            for variant, times in samples.items():
                us = statistics.median(times) * 1e3
                row[variant] = {"us": us, "gb_per_s": moved / us / 1e3}
            row["speedup"] = row["megatron"]["us"] / row["monta"]["us"]
            if direction == "forward":
                got, want = variants["monta"](), _apply_rotary_pos_emb_bshd(t.float(), freqs)
                row["rel_err_vs_fp32"] = ((got.float() - want).norm() / want.norm()).item()
    out = {"environment": environment(device), "rounds": opts.rounds, "rows": rows}
    opts.out.write_text(json.dumps(out, indent=1))
    lines = [f"RoPE per call ({out['environment'].get('device')}, commit "
             f"{out['environment'].get('git_commit')}; medians of 20 calls back to back, "
             f"{opts.rounds} interleaved rounds; GB/s of one read and one write):", "",
             "| tensor | shape | MoNTA µs | GB/s | megatron µs | GB/s | speedup |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['shape']} | {row['monta']['us']:.1f} | "
                     f"{row['monta']['gb_per_s']:.0f} | {row['megatron']['us']:.1f} | "
                     f"{row['megatron']['gb_per_s']:.0f} | {row['speedup']:.1f}× |")
    opts.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _megatron_backward(rope_fn, t, freqs, grad):
    """One backward of megatron's unfused RoPE (its autograd graph kept for every call)."""
    leaf = t.detach().requires_grad_(True)
    out = rope_fn(leaf, freqs)
    return lambda: torch.autograd.grad(out, leaf, grad, retain_graph=True)


if __name__ == "__main__":
    raise SystemExit(main())
