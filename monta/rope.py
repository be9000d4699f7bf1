"""Rotary position embedding as one Triton kernel each way (CUDA), for runs without TE.

megatron-core fuses RoPE only through Transformer Engine (``apply_rope_fusion`` asserts TE).
Without it, ``_apply_rotary_pos_emb_bshd`` makes about ten passes over query and key per layer,
forward and backward: cos and sin casts, two products, ``chunk`` + negate + ``cat`` for the
rotated half, a sum, a final ``cat``. On an H200, in the 0.82 B-parameter training run of
``bench/gpu_moe.py`` (GQA, head dim 128, 16 × 2048 tokens), those kernels took ~70 of
~690 ms per iteration (a ``--profile --use-pytorch-profiler`` trace); with this kernel the
iteration went from 700 to 641 ms (``bench/results/gpu_train_fusions.json``).

Here each program takes one sequence position and :data:`BLOCK_ROWS` of its ``b · heads`` rows
(from any strides: query and key are views of the fused QKV projection), computes that
position's cos and sin once for all of them, reads each row once as its two halves and writes
the rotated row. A first version, one row per step with cos and sin per element, ran at
~1 TB/s (22 ms of the iteration's 128 calls); this one took the query's backward from 235 to
100 µs and the key's forward from 60 to 30 µs at those shapes (a scratch A/B), moves the
query at 2.7 TB/s, 9–10× faster than megatron's unfused RoPE (``bench/gpu_rope.py``,
``bench/results/gpu_rope.md``), and dropped out of the training profile's top 15 (< 12 ms per
iteration, ``bench/results/gpu_moe.md``). What it computes:

    out[c] = t[c]·cos[c] − t[c + R/2]·sin[c]       c < R/2
    out[c] = t[c]·cos[c] + t[c − R/2]·sin[c]       R/2 ≤ c < R
    out[c] = t[c]                                  R ≤ c       (the part RoPE leaves alone)

and its backward, the transpose:

    dt[c]  = d[c]·cos[c] + d[c + R/2]·sin[c + R/2]     c < R/2
    dt[c]  = d[c]·cos[c] − d[c − R/2]·sin[c − R/2]     R/2 ≤ c < R

R is ``freqs``' last dimension (megatron's ``[s, 1, 1, R]`` fp32 angles). Arithmetic is fp32,
one rounding to the output dtype; megatron's unfused version rounds cos and sin to bf16 first
and after each op, so the two agree to bf16 precision, not bitwise.

:func:`install` routes megatron's attention to it for configs that ask for it
(``config.monta_rope_fusion``, set from ``--no-rope-fusion``'s absence when TE is missing); any
call it does not cover (packed sequences, interleaved or multi-latent RoPE, ``mscale``, CPU)
goes to megatron's own function, and so does every call after the kernel failed once (e.g.
Triton cannot compile it for the GPU; one warning).
"""

from __future__ import annotations

import logging

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: megatron's unfused RoPE runs
    triton = None

# Rows (of the b·heads rows sharing one position) per program: cos and sin are computed once per
# program for all of them, and each thread moves 16-byte vectors.
BLOCK_ROWS = 32
logger = logging.getLogger(__name__)
_failed: list[Exception] = []  # the fused kernel raised once here: megatron's RoPE from then on

if triton is not None:

    @triton.jit
    def _rope_kernel(t_ptr, freqs_ptr, out_ptr, rows_per_position, H, stride_s, stride_b,
                     stride_h, stride_freqs, D: tl.constexpr, R: tl.constexpr,
                     HALF_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BACKWARD: tl.constexpr):
        half: tl.constexpr = R // 2
        s = tl.program_id(0).to(tl.int64)
        row = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # of the b·heads rows
        row_ok = row < rows_per_position
        base = s * stride_s + (row // H).to(tl.int64) * stride_b + (row % H) * stride_h
        out_base = (s * rows_per_position + row) * D
        cols = tl.arange(0, HALF_BLOCK)
        cols_ok = cols < half
        # One position per program: its angles, cos and sin once for every row.
        angle_1 = tl.load(freqs_ptr + s * stride_freqs + cols, mask=cols_ok, other=0.0)
        angle_2 = tl.load(freqs_ptr + s * stride_freqs + half + cols, mask=cols_ok, other=0.0)
        cos_1, sin_1 = tl.cos(angle_1)[None, :], tl.sin(angle_1)[None, :]
        cos_2, sin_2 = tl.cos(angle_2)[None, :], tl.sin(angle_2)[None, :]
        ok = row_ok[:, None] & cols_ok[None, :]
        first = base[:, None] + cols[None, :]
        x_1 = tl.load(t_ptr + first, mask=ok, other=0.0).to(tl.float32)
        x_2 = tl.load(t_ptr + first + half, mask=ok, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose: each half's partner term with the partner's angle
            y_1 = x_1 * cos_1 + x_2 * sin_2
            y_2 = x_2 * cos_2 - x_1 * sin_1
        else:
            y_1 = x_1 * cos_1 - x_2 * sin_1
            y_2 = x_2 * cos_2 + x_1 * sin_2
        out_first = out_base[:, None] + cols[None, :]
        tl.store(out_ptr + out_first, y_1.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out_ptr + out_first + half, y_2.to(out_ptr.dtype.element_ty), mask=ok)
        if PASS_BLOCK > 0:  # columns R.. D: RoPE leaves them alone
            rest = tl.arange(0, PASS_BLOCK)
            rest_ok = row_ok[:, None] & (rest < D - R)[None, :]
            kept = tl.load(t_ptr + base[:, None] + R + rest[None, :], mask=rest_ok)
            tl.store(out_ptr + out_base[:, None] + R + rest[None, :], kept, mask=rest_ok)


def _rotate(t: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    """``t`` [s, b, heads, D] (any strides, last one 1) through the kernel; contiguous out."""
    s, b, heads, dim = t.shape
    out = torch.empty((s, b, heads, dim), device=t.device, dtype=t.dtype)
    rot_dim = freqs.size(-1)
    if out.numel():
        freqs2d = freqs.reshape(freqs.size(0), rot_dim)
        grid = (s, triton.cdiv(b * heads, BLOCK_ROWS))
        _rope_kernel[grid](
            t, freqs2d, out, b * heads, heads, t.stride(0), t.stride(1), t.stride(2),
            freqs2d.stride(0), D=dim, R=rot_dim, HALF_BLOCK=triton.next_power_of_2(rot_dim // 2),
            PASS_BLOCK=triton.next_power_of_2(dim - rot_dim) if dim > rot_dim else 0,
            BLOCK_ROWS=BLOCK_ROWS, BACKWARD=backward, num_warps=4)
    return out


class FusedRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):
        ctx.save_for_backward(freqs)
        return _rotate(t, freqs, backward=False)

    @staticmethod
    def backward(ctx, grad):
        (freqs,) = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return _rotate(grad, freqs, backward=True), None


def fused_rope_applies(t: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether the kernel covers ``t`` [s, b, heads, D] with angles ``freqs`` [s, 1, 1, R]."""
    return (triton is not None and t.is_cuda and t.dim() == 4 and t.stride(-1) == 1
            and t.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and freqs.dtype == torch.float32 and freqs.dim() == 4 and freqs.size(0) == t.size(0)
            and freqs.size(1) == freqs.size(2) == 1 and freqs.size(-1) % 2 == 0
            and 0 < freqs.size(-1) <= t.size(-1) and freqs.stride(-1) == 1)


def fused_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Differentiable RoPE of ``t`` (see the module doc); needs :func:`fused_rope_applies`."""
    return FusedRoPE.apply(t, freqs)


def install() -> None:
    """Route megatron's attention through :func:`fused_rope` where its config sets
    ``monta_rope_fusion`` (idempotent; other configs and calls keep megatron's function)."""
    from megatron.core.transformer import attention

    if getattr(attention.apply_rotary_pos_emb, "monta_fused", False):
        return
    stock = attention.apply_rotary_pos_emb

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        if (getattr(config, "monta_rope_fusion", False) and not _failed and cu_seqlens is None
                and mscale == 1.0 and not config.rotary_interleaved
                and not config.multi_latent_attention and fused_rope_applies(t, freqs)):
            try:
                return fused_rope(t, freqs)
            except Exception as error:  # e.g. Triton cannot compile the kernel for this GPU
                logger.warning("fused RoPE unavailable (%s: %s); using megatron's unfused RoPE",
                               type(error).__name__, error)
                _failed.append(error)
        return stock(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)

    apply_rotary_pos_emb.monta_fused = True
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb
