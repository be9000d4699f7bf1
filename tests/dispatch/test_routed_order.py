"""monta/dispatch/routed_order.py on CPU (torch ops; tests/gpu checks the Triton kernel against
them): the probabilities in expert order and the order equal megatron's softmax top-k routing
followed by the dispatcher's order, and so does the logits' gradient."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

from monta.dispatch.plan import order_by_expert_topk
from monta.dispatch.routed_order import route_in_expert_order


@pytest.mark.parametrize("tokens,experts,topk", [(64, 8, 2), (50, 16, 4), (33, 64, 6),
                                                 (7, 4, 4), (0, 8, 2)])
def test_route_in_expert_order_equals_megatron_routing_then_order(tokens, experts, topk):
    gen = torch.Generator().manual_seed(tokens + experts)
    logits = torch.randn(tokens, experts, generator=gen)
    weights = torch.randn(tokens * topk, generator=gen)

    ours = logits.clone().requires_grad_(True)
    probs, order = route_in_expert_order(ours, topk)
    (probs * weights).sum().backward()

    theirs = logits.clone().requires_grad_(True)
    dense, routing_map = topk_routing_with_score_function(theirs, topk)
    want = order_by_expert_topk(routing_map, topk, use_kernel=False)
    (dense[want.rows, want.experts] * weights).sum().backward()

    for name in ("rows", "experts", "tokens_per_expert"):
        assert torch.equal(getattr(order, name), getattr(want, name)), name
    copies = torch.arange(tokens).repeat_interleave(topk)
    assert torch.equal(order.rows[order.inverse], copies)  # copy t·k + j sits at row inverse
    assert torch.equal(order.inverse[order.flat], torch.arange(tokens * topk))
    assert torch.equal(probs, dense[order.rows, order.experts])
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)


def test_route_in_expert_order_rounds_like_megatron_in_bf16():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 8, generator=gen).to(torch.bfloat16)
    probs, order = route_in_expert_order(logits, 2)
    dense, _ = topk_routing_with_score_function(logits, 2)
    assert probs.dtype == torch.bfloat16
    assert torch.equal(probs, dense[order.rows, order.experts])
