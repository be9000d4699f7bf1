"""Triton kernels for the one-rank dispatch path (CUDA): the expert order and the k-way sum.

Shapes: T tokens, E experts, k = top-k, H hidden; n = T·k expert rows.

Why kernels: on one GPU the layer's work before the first expert GEMM is a chain of small
launches, each costing the host ~40 µs (H200 machine, measured) while the GPU waits, so the
torch version of :func:`monta.dispatch.plan.order_by_expert_topk` (topk over the mask, a radix
argsort, index_add, scatter: ~15 launches, ~1 ms of host time at Mixtral shapes) delays every
GEMM behind it. :func:`expert_order` is one launch. :func:`gather_sum` replaces
``index_select`` + ``view`` + ``sum`` (two passes and a [n, H] temporary) in the combine and in
the dispatch's backward: at Mixtral shapes 0.22 → 0.065 ms each.

Both compute exactly what the torch versions compute (the order: rows ascending within each
expert; the sum: fp32 accumulation, one rounding), checked in tests/gpu.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use the torch versions
    triton = None


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


if triton is not None:

    @triton.jit
    def _exactly_k(m, K: tl.constexpr):
        """Each row of the 0/1 matrix ``m`` [BT, EP] with exactly K ones, as
        ``torch.topk(mask, K)`` picks them: rows with fewer get their first unselected columns
        (their probabilities are 0: extra copies that add nothing); extra ones are dropped."""
        short = K - tl.sum(m, axis=1)
        free_rank = tl.cumsum(1 - m, axis=1)  # 1-based among unselected
        m = tl.where((m == 0) & (free_rank <= short[:, None]), 1, m)
        return tl.where(tl.cumsum(m, axis=1) <= K, m, 0)

    @triton.jit
    def _expert_order_kernel(mask_ptr, rows_ptr, experts_ptr, flat_ptr, inverse_ptr, counts_ptr,
                             T, E: tl.constexpr, EP: tl.constexpr, K: tl.constexpr,
                             BT: tl.constexpr):
        # One program: two passes over the [T, E] mask (T·E bytes, L2-resident).
        cols = tl.arange(0, EP)
        col_ok = cols < E
        counts = tl.zeros([EP], dtype=tl.int32)
        for start in range(0, T, BT):  # 1) copies per expert
            t = start + tl.arange(0, BT)
            ok = (t < T)[:, None] & col_ok[None, :]
            m = tl.load(mask_ptr + t[:, None] * E + cols[None, :], mask=ok, other=0).to(tl.int32)
            m = tl.where(ok, _exactly_k(m, K), 0)
            counts += tl.sum(m, axis=0)
        tl.store(counts_ptr + cols, counts.to(tl.int64), mask=col_ok)
        next_row = tl.cumsum(counts, axis=0) - counts  # first free expert row per expert
        for start in range(0, T, BT):  # 2) each copy's row, rows ascending within an expert
            t = start + tl.arange(0, BT)
            ok = (t < T)[:, None] & col_ok[None, :]
            m = tl.load(mask_ptr + t[:, None] * E + cols[None, :], mask=ok, other=0).to(tl.int32)
            m = tl.where(ok, _exactly_k(m, K), 0)
            sel = m != 0
            dest = (next_row[None, :] + tl.cumsum(m, axis=0) - 1).to(tl.int64)  # [BT, EP]
            choice = tl.cumsum(m, axis=1) - 1  # j: copy t·K + j, experts ascending
            tokens = tl.broadcast_to(t[:, None], (BT, EP)).to(tl.int64)
            experts = tl.broadcast_to(cols[None, :], (BT, EP)).to(tl.int64)
            tl.store(inverse_ptr + tokens * K + choice, dest, mask=sel)
            tl.store(rows_ptr + dest, tokens, mask=sel)
            tl.store(experts_ptr + dest, experts, mask=sel)
            tl.store(flat_ptr + dest, tokens * E + experts, mask=sel)
            next_row += tl.sum(m, axis=0)

    @triton.jit
    def _gather_sum_kernel(y_ptr, idx_ptr, out_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(idx_ptr + t * K + j).to(tl.int64)
            acc += tl.load(y_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty),
                 mask=mask)


def expert_order(mask: torch.Tensor, topk: int):
    """``mask`` [T, E] bool → (rows [n], experts [n], flat [n] = rows·E + experts,
    inverse [n], counts [E]), all int64, n = T·topk; see plan.order_by_expert_topk."""
    T, E = mask.shape
    n = T * topk
    out = torch.empty(4, n, dtype=torch.int64, device=mask.device)
    counts = torch.empty(E, dtype=torch.int64, device=mask.device)
    if T:
        ep = triton.next_power_of_2(E)
        bt = max(16, min(256, 4096 // ep))  # a [BT, EP] block of 4K entries in registers
        _expert_order_kernel[(1,)](mask.contiguous().view(torch.uint8), out[0], out[1], out[2],
                                   out[3], counts, T, E=E, EP=ep, K=topk, BT=bt, num_warps=8)
    else:
        counts.zero_()
    rows, experts, flat, inverse = out.unbind(0)
    return rows, experts, flat, inverse, counts


def gather_sum(y: torch.Tensor, index: torch.Tensor, topk: int, block: int = 1024):
    """``out[t] = Σ_j y[index[t·topk + j]]`` for y [n, H] → [n / topk, H], y's dtype."""
    y = y.contiguous()
    tokens, hidden = index.numel() // topk, y.size(1)
    out = torch.empty(tokens, hidden, dtype=y.dtype, device=y.device)
    if tokens and hidden:
        _gather_sum_kernel[(tokens, triton.cdiv(hidden, block))](y, index, out, hidden, K=topk,
                                                                 BLOCK=block)
    return out
