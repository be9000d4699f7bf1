"""Token ↔ expert-row permutation for dropless top-k on one rank, as gathers both ways.

With every token routed to exactly k local experts
(:func:`monta.dispatch.plan.order_by_expert_topk`), copy ``i = t·k + j`` (token t's j-th choice) sits at row ``inverse[i]`` of the expert input, and
row ``p`` holds token ``rows[p]``. Indexing ``x[rows]`` and summing back with ``index_add``
would work, but their backward passes (and ``index_add`` itself) are scatters with atomics;
knowing the inverse turns all four directions into plain gathers plus a sum over k:

    dispatch  forward: x[rows]                         backward: g[inverse].view(T, k, H).sum(1)
    combine   forward: y[inverse].view(T, k, H).sum(1) backward: g[rows]
"""

from __future__ import annotations

import torch


class ExpandToExperts(torch.autograd.Function):
    """[T, H] tokens → [T·k, H] expert rows (each token k times, in expert order)."""

    @staticmethod
    def forward(ctx, x, rows, inverse, topk: int):
        ctx.save_for_backward(inverse)
        ctx.topk = topk
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        summed = grad.index_select(0, inverse).view(-1, ctx.topk, grad.size(-1)).sum(1)
        return summed, None, None, None


class SumFromExperts(torch.autograd.Function):
    """[T·k, H] expert outputs → [T, H]: each token's k outputs summed (already prob-weighted)."""

    @staticmethod
    def forward(ctx, y, rows, inverse, topk: int):
        ctx.save_for_backward(rows)
        return y.index_select(0, inverse).view(-1, topk, y.size(-1)).sum(1)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.index_select(0, rows), None, None, None
