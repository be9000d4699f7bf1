"""monta/swiglu.py's layouts on CPU (its Triton kernels run in tests/gpu and, under Triton's
interpreter, in tests/test_experts.py)."""

import pytest
import torch

from monta import swiglu


def test_paired_h_holds_runs_of_gate_then_up_columns_of_the_same_outputs():
    """Paired in runs of P: columns [2iP, 2iP + P) are gate columns [iP, iP + P) and the next P
    the up columns of the same outputs; unpair inverts pair."""
    n, f, p = 3, 12, 4
    h = torch.arange(n * 2 * f).view(n, 2 * f)
    paired = swiglu.pair(h, p)
    gate, up = h[:, :f], h[:, f:]
    for i in range(f // p):
        assert torch.equal(paired[:, 2 * i * p:2 * i * p + p], gate[:, i * p:(i + 1) * p])
        assert torch.equal(paired[:, 2 * i * p + p:2 * (i + 1) * p], up[:, i * p:(i + 1) * p])
    assert torch.equal(swiglu.unpair(paired, p), h)
    assert torch.equal(swiglu.pair(h, f), h)  # one run each: megatron's layout


def test_the_paired_backward_refuses_runs_that_do_not_divide_f():
    h = torch.zeros(2, 24)
    with pytest.raises(ValueError, match="paired runs of 5 columns must divide F = 12"):
        swiglu.weighted_swiglu_backward(h, torch.ones(2, 1), torch.zeros(2, 12), paired=5)
