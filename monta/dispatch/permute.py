"""Token ↔ expert-row permutation for dropless top-k on one rank, as gathers both ways.

With every token routed to exactly k local experts
(:func:`monta.dispatch.plan.order_by_expert_topk`), copy ``i = t·k + j`` (token t's j-th choice) sits at row ``inverse[i]`` of the expert input, and
row ``p`` holds token ``rows[p]``. Indexing ``x[rows]`` and summing back with ``index_add``
would work, but their backward passes (and ``index_add`` itself) are scatters with atomics;
knowing the inverse turns all four directions into plain gathers plus a sum over k:

    dispatch  forward: x[rows]                         backward: g[inverse].view(T, k, H).sum(1)
    combine   forward: y[inverse].view(T, k, H).sum(1) backward: g[rows]

The gather-and-sum is one Triton kernel on GPUs (:func:`monta.dispatch.kernels.gather_sum`:
one pass, no [T·k, H] temporary).
"""

from __future__ import annotations

import torch

from monta.dispatch import kernels


def _gather_sum(y: torch.Tensor, index: torch.Tensor, topk: int) -> torch.Tensor:
    """``y[index].view(-1, topk, H).sum(1)``."""
    if kernels.available(y):
        return kernels.gather_sum(y, index, topk)
    return y.index_select(0, index).view(-1, topk, y.size(-1)).sum(1)


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
        return _gather_sum(grad, inverse, ctx.topk), None, None, None


class SumFromExperts(torch.autograd.Function):
    """[T·k, H] expert outputs → [T, H]: each token's k outputs summed (already prob-weighted)."""

    @staticmethod
    def forward(ctx, y, rows, inverse, topk: int):
        ctx.save_for_backward(rows)
        return _gather_sum(y, inverse, topk)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.index_select(0, rows), None, None, None


class GatherFlat(torch.autograd.Function):
    """``x.reshape(-1)[index]`` where no entry is taken twice (the router probabilities of
    each (token, expert) copy): the backward is a plain copy into zeros, where advanced
    indexing's would be a sort plus an accumulating scatter."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return x.reshape(-1).index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.shape.numel()).index_copy_(0, index, grad)
        return out.view(ctx.shape), None
