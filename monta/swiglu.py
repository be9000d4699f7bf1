"""SwiGLU × router probability for the grouped experts, as two Triton kernels (CUDA).

``y = silu(gate) · up · prob`` per row, where each row of ``h`` is ``[gate | up]`` (``F`` columns
each, megatron's GLU layout) and ``prob`` is the row's router probability. It is the only
non-GEMM pass over the experts' ``[rows, 2F]`` activations, so its memory traffic matters: at
Mixtral shapes that tensor is ~1 GB. torch.compile of the same expression made its backward one
pointwise kernel over a ``cat`` of the two half-gradients, which ran at about 0.7 TB/s on an
H200 (3.6 ms per layer at Mixtral shapes), plus a second pass for the probability gradient; here
one program per row reads ``h`` and the incoming gradient once, writes both half-gradients in
place and keeps the row sum for ``d prob`` in registers:

    forward:   y  = silu(g)·u·p
    backward:  dg = dy·p·u·silu'(g),  du = dy·p·silu(g),  dp = Σ_cols dy·silu(g)·u
               silu'(g) = σ(g)·(1 + g·(1 − σ(g)))

Arithmetic is fp32 inside, one rounding to the output dtype (megatron's eager version rounds
after each op, so the two agree to bf16 precision, not bitwise).

The backward also reads ``h`` *paired* (``paired=P``): each run of 2·P columns holds P gate
columns and then the P up columns of the same outputs, the layout in which MoNTA's sm90 fc1
with the forward in its epilogue writes it (monta/csrc/sm90_swiglu_fc1.cuh); ``dh`` comes out in
megatron's layout either way. :func:`pair` and :func:`unpair` convert between the two.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: monta.experts falls back to eager ops
    triton = None

BLOCK = 1024
# F (the expert FFN width) is a compile-time constant of the kernels: one compilation per
# model, and the compiler sees the row offsets' alignment, so loads are vectorised.


def available(x: torch.Tensor) -> bool:
    """Usable for ``x`` here: Triton imports and ``x`` lives on a GPU (or under the Triton
    interpreter, ``TRITON_INTERPRET=1``, which tests use on CPU)."""
    import os

    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _forward_kernel(h_ptr, p_ptr, y_ptr, F: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = cols < F
        gate = tl.load(h_ptr + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
        prob = tl.load(p_ptr + row).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up * prob
        tl.store(y_ptr + row * F + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(h_ptr, p_ptr, dy_ptr, dh_ptr, dp_ptr, F: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, PAIRED: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        prob = tl.load(p_ptr + row).to(tl.float32)
        acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for start in range(0, F, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < F
            if PAIRED:  # h's gate column c sits in run c // P, its up column P further
                gate_at = (cols // PAIRED) * (2 * PAIRED) + cols % PAIRED
                up_at = gate_at + PAIRED
            else:
                gate_at, up_at = cols, F + cols
            gate = tl.load(h_ptr + row * 2 * F + gate_at, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(h_ptr + row * 2 * F + up_at, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            d_gate = dy * prob * up * sig * (1.0 + gate * (1.0 - sig))
            d_up = dy * prob * silu
            out_ty = dh_ptr.dtype.element_ty
            tl.store(dh_ptr + row * 2 * F + cols, d_gate.to(out_ty), mask=mask)
            tl.store(dh_ptr + row * 2 * F + F + cols, d_up.to(out_ty), mask=mask)
            acc += tl.where(mask, dy * silu * up, 0.0)
        tl.store(dp_ptr + row, tl.sum(acc, axis=0))


class WeightedSwiGLU(torch.autograd.Function):
    """``h [n, 2F]``, ``probs [n, 1]`` → ``[n, F]`` in ``h``'s dtype (see module docstring)."""

    @staticmethod
    def forward(ctx, h, probs):
        h = h.contiguous()
        probs = probs.contiguous()
        ctx.save_for_backward(h, probs)
        return weighted_swiglu_forward(h, probs)

    @staticmethod
    def backward(ctx, dy):
        h, probs = ctx.saved_tensors
        dh, dp = weighted_swiglu_backward(h, probs, dy)
        return dh, dp.view_as(probs).to(probs.dtype)


def weighted_swiglu_forward(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``y [n, F]`` for contiguous ``h [n, 2F]`` and ``probs [n, 1]``, outside autograd."""
    n, width = h.shape
    ffn = width // 2
    y = torch.empty(n, ffn, dtype=h.dtype, device=h.device)
    if n:
        _forward_kernel[(n, triton.cdiv(ffn, BLOCK))](h, probs, y, ffn, BLOCK_SIZE=BLOCK)
    return y


def weighted_swiglu_backward(h: torch.Tensor, probs: torch.Tensor, dy: torch.Tensor,
                             paired: int = 0):
    """(dh [n, 2F], dp [n] fp32) for ``y = silu(gate)·up·prob`` given ``dy`` [n, F]; ``h`` in
    megatron's layout, or paired in runs of ``paired`` columns (module doc). ``dh`` is in
    megatron's layout."""
    dy = dy.contiguous()
    n, width = h.shape
    if paired and (width // 2) % paired:
        raise ValueError(f"paired runs of {paired} columns must divide F = {width // 2}")
    dh = torch.empty_like(h)
    dp = torch.empty(n, dtype=torch.float32, device=h.device)
    if n:
        _backward_kernel[(n,)](h, probs, dy, dh, dp, width // 2, BLOCK_SIZE=BLOCK,
                               PAIRED=paired)
    return dh, dp


def unpair(h: torch.Tensor, paired: int) -> torch.Tensor:
    """``h`` [n, 2F] paired in runs of ``paired`` columns (module doc) in megatron's
    ``[gate | up]`` layout."""
    n, width = h.shape
    return h.view(n, width // (2 * paired), 2, paired).transpose(1, 2).reshape(n, width)


def pair(h: torch.Tensor, paired: int) -> torch.Tensor:
    """The inverse of :func:`unpair`."""
    n, width = h.shape
    return h.view(n, 2, width // (2 * paired), paired).transpose(1, 2).reshape(n, width)


def weighted_swiglu(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return WeightedSwiGLU.apply(h, probs)
