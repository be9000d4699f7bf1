"""Top-k routing straight into the expert order, for the one-rank path (EP = ETP = 1, dropless).

Shapes: T tokens, E experts, k = top-k; n = T·k expert rows.

megatron's router turns its top-k into dense [T, E] probabilities and a [T, E] map (two
scatters), and the dispatcher turns the map back into an expert order and gathers the
probabilities from [T, E]. On one GPU every one of those small launches costs the host
~40–70 µs while the GPU waits for the first expert GEMM. Here the router's softmax top-k goes
into the order without dense tensors: :func:`route_in_expert_order` returns the routing
probabilities already in expert order and the :class:`~monta.dispatch.plan.ExpertOrder` itself,
on a GPU from two Triton launches (:func:`monta.dispatch.kernels.topk_softmax_order`).

Same numbers as megatron's ``topk_routing_with_score_function`` (softmax score function, top-k
then softmax over the k logits in fp32, rounded to the logits' dtype) followed by the dispatcher's
``order_by_expert_topk``; the backward is the softmax's, in fp32 as megatron's, scattered into
the [T, E] logits gradient. On a GPU ties between logits go to the lower expert id (torch's top-k
leaves their order unspecified).
"""

from __future__ import annotations

import torch

from monta.dispatch import kernels
from monta.dispatch.plan import ExpertOrder, order_of_choices


def _route(logits: torch.Tensor, topk: int):
    """(probabilities [n] in expert order, idx [T, k] each token's experts ascending, p [T, k]
    fp32 softmax in idx's order, the order), without autograd: one kernel on a GPU, else
    megatron's top-k and softmax in torch ops followed by a sort."""
    if kernels.available(logits):
        probs, idx, p, rows, experts, flat, inverse, counts, ends = kernels.topk_softmax_order(
            logits, topk)
        if ends is not None:
            # the grouped experts take these instead of a cumsum launch (monta.experts)
            counts.row_ends = ends
        return probs, idx, p, ExpertOrder(rows, experts, counts, inverse, topk, flat)
    scores, idx = torch.topk(logits, topk, dim=1)
    idx, pos = idx.sort(dim=1)
    p = torch.softmax(scores.float(), dim=-1).gather(1, pos)
    order = order_of_choices(idx, logits.size(1))
    return p.to(logits.dtype).reshape(-1).index_select(0, order.flat), idx, p, order


class _SoftmaxTopKInExpertOrder(torch.autograd.Function):
    """The routing probabilities in expert order as a function of the logits [T, E]: forward
    hands back what :func:`_route` computed, backward is the softmax's, scattered to [T, E]."""

    @staticmethod
    def forward(ctx, logits, probs, idx, p, inverse):
        ctx.save_for_backward(idx, p, inverse)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad):
        idx, p, inverse = ctx.saved_tensors
        g = grad.index_select(0, inverse).view(p.shape).float()  # back to [T, k]
        # softmax backward in fp32, as megatron's (softmax(..., dtype=float32).type_as(logits))
        dscores = (p * (g - (g * p).sum(-1, keepdim=True))).to(ctx.logits_dtype)
        dlogits = torch.zeros(ctx.logits_shape, dtype=ctx.logits_dtype, device=grad.device)
        return dlogits.scatter_(1, idx, dscores), None, None, None, None


def route_in_expert_order(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, ExpertOrder]:
    """Softmax top-k routing of ``logits`` [T, E]: (probabilities [T·k] in expert order, the
    order). ``order.flat`` holds each row's copy index t·k + j."""
    with torch.no_grad():
        probs, idx, p, order = _route(logits, topk)
    return _SoftmaxTopKInExpertOrder.apply(logits, probs, idx, p, order.inverse), order
