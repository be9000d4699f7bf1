"""monta/dispatch/padded_order.py: each expert's rows moved to start at a multiple of the
alignment, pads as zero-probability copies of token 0, the probabilities still differentiable;
and the experts' loop computes on that layout (the layer test in test_moe_layer_reference.py
runs the whole padded path against the dense reference)."""

from __future__ import annotations

import pytest
import torch

from monta.dispatch.padded_order import pad_expert_order, padded_capacity, padded_positions
from monta.dispatch.plan import order_by_expert_topk
from monta.experts import grouped_mm


def _order(tokens: int, experts: int, topk: int, seed: int, skip=()):
    """A dropless top-k order whose ``skip`` experts get no rows."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen)
    scores[:, list(skip)] = -1.0
    mask = torch.zeros(tokens, experts, dtype=torch.bool)
    mask.scatter_(1, scores.topk(topk, dim=1).indices, True)
    return order_by_expert_topk(mask, topk, use_kernel=False)


@pytest.mark.parametrize("alignment", [1, 4, 16])
def test_pad_expert_order_aligns_experts_and_keeps_every_copy(alignment):
    order = _order(tokens=37, experts=8, topk=3, seed=alignment, skip=(1, 6))
    probs = torch.rand(order.rows.numel(), dtype=torch.float64).requires_grad_(True)
    padded, padded_probs = pad_expert_order(order, probs, alignment)

    counts = order.tokens_per_expert.tolist()
    assert counts[1] == counts[6] == 0 and padded.tokens_per_expert.tolist() == counts
    ends = padded.tokens_per_expert.row_ends
    assert ends.dtype == torch.int32 and ends.alignment == alignment
    sizes = [-(-c // alignment) * alignment for c in counts]
    assert ends.tolist() == torch.tensor(sizes).cumsum(0).tolist()
    n = order.rows.numel()
    assert padded.rows.numel() == padded_probs.numel() == padded_capacity(n, 8, alignment)
    # expert e's real rows fill [start, start + count) of its aligned block, in the old order
    starts = [end - size for end, size in zip(ends.tolist(), sizes)]
    real = torch.zeros(padded.rows.numel(), dtype=torch.bool)
    old = 0
    for e, (start, count) in enumerate(zip(starts, counts)):
        assert start % alignment == 0
        assert torch.equal(padded.rows[start:start + count], order.rows[old:old + count])
        assert torch.equal(padded.experts[start:start + count], order.experts[old:old + count])
        real[start:start + count] = True
        old += count
    # every (token, choice) copy lands on the same token with the same probability
    assert torch.equal(padded.rows[padded.inverse], order.rows[order.inverse])
    assert torch.equal(padded_probs[padded.inverse], probs[order.inverse])
    # pads: token 0, probability 0, no expert
    assert (padded.rows[~real] == 0).all() and (padded_probs[~real] == 0).all()
    assert (padded.experts[~real] == -1).all()
    # the probabilities' gradient comes back to the unpadded ones
    weights = torch.rand(padded_probs.numel(), dtype=torch.float64)
    (padded_probs * weights).sum().backward()
    assert torch.equal(probs.grad[order.inverse], weights[padded.inverse])


def test_padded_positions_without_rows_and_with_empty_experts():
    positions, ends = padded_positions(torch.tensor([0, 5, 0, 8, 1]), 4)
    assert positions.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    assert ends.tolist() == [0, 8, 8, 16, 20] and ends.alignment == 4
    positions, ends = padded_positions(torch.zeros(3, dtype=torch.long), 8)
    assert positions.numel() == 0 and ends.tolist() == [0, 0, 0]
    order = _order(tokens=0, experts=4, topk=2, seed=0)
    probs = torch.zeros(0)
    assert pad_expert_order(order, probs, 8) == (order, probs)  # nothing to pad


def test_grouped_mm_loop_computes_on_padded_rows():
    """The experts' CPU loop splits padded rows by the padded ends: real rows get their
    expert's product, rows past the last end come back zero."""
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 6, 1])
    w = torch.randn(4, 5, 7, generator=gen)
    x = torch.randn(int(counts.sum()), 5, generator=gen)
    positions, ends = padded_positions(counts, 4)
    capacity = padded_capacity(x.size(0), 4, 4)
    xp = torch.randn(capacity, 5, generator=gen).index_copy_(0, positions, x)
    tokens_per_expert = counts.clone()
    tokens_per_expert.row_ends = ends
    out = grouped_mm(xp, w, tokens_per_expert)
    want = grouped_mm(x, w, counts)
    assert out.shape == (capacity, 7)
    torch.testing.assert_close(out[positions], want)
    assert (out[int(ends[-1]):] == 0).all()
