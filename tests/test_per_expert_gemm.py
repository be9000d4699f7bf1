"""monta/per_expert_gemm.py: the per-expert GEMMs against a dense fp64 reference, and when they
are chosen (on a GPU inside the MoE layer: tests/gpu/test_gpu_moe.py)."""

from __future__ import annotations

import pytest
import torch

from monta import per_expert_gemm
from monta.per_expert_gemm import per_expert_mm, per_expert_wanted

MIXTRAL_W2 = (8, 14336, 4096)  # [E, F, H]
FINE_GRAINED_W2 = (64, 1408, 2048)


def _reference(x, w, splits):
    """Each expert's rows times its weight, in fp64, one block at a time."""
    blocks = torch.split(x.double(), splits)
    return torch.cat([block @ w[e].double() for e, block in enumerate(blocks)])


@pytest.mark.parametrize("splits", [[3, 0, 5, 1], [0, 0, 9, 0], [2, 2, 2, 2], [0, 7, 0, 0]])
@pytest.mark.parametrize("transposed", [False, True])
def test_per_expert_mm_matches_fp64_with_uneven_and_empty_experts(splits, transposed):
    gen = torch.Generator().manual_seed(sum(splits) * 7 + len(splits))
    x = torch.randn(sum(splits), 6, generator=gen, requires_grad=True)
    if transposed:  # [E, K, N] as a view of [E, N, K] storage, like an nn.Linear per expert
        w = torch.randn(4, 5, 6, generator=gen).transpose(1, 2).requires_grad_(True)
    else:
        w = torch.randn(4, 6, 5, generator=gen, requires_grad=True)
    grad = torch.randn(sum(splits), 5, generator=gen)

    out = per_expert_mm(x, w, splits)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    want = _reference(x64, w64, splits)
    want.backward(grad.double())

    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    for e, count in enumerate(splits):
        if count == 0:
            assert torch.count_nonzero(w.grad[e]) == 0  # empty experts: zero, not garbage


def test_per_expert_mm_without_weight_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(2, 3, 2)  # frozen experts
    per_expert_mm(x, w, [1, 3]).sum().backward()
    torch.testing.assert_close(x.grad, torch.cat([w[0].sum(1).expand(1, 3),
                                                  w[1].sum(1).expand(3, 3)]))


def test_large_experts_run_per_expert_by_default_small_ones_grouped():
    rows = 8192 * 2  # top-2 of 8192 tokens
    assert per_expert_wanted(rows, MIXTRAL_W2, "default")  # 240 GFLOP per fc2 GEMM
    assert not per_expert_wanted(8192 * 6, FINE_GRAINED_W2, "default")  # 4.4 GFLOP
    # the threshold itself, from the mean rows per expert
    experts, ffn, hidden = 4, 1024, 1024
    at = int(per_expert_gemm.MIN_EXPERT_GFLOP * 1e9 / (2 * ffn * hidden)) * experts
    assert per_expert_wanted(at + experts, (experts, ffn, hidden), "default")
    assert not per_expert_wanted(at - experts, (experts, ffn, hidden), "default")


@pytest.mark.parametrize("pin", ["grouped", "torch", "auto", "triton", "sm90:128x256_c1x2"])
def test_a_pinned_grouped_kernel_is_never_replaced(pin):
    assert not per_expert_wanted(8192 * 2, MIXTRAL_W2, pin)


def test_cublas_pin_runs_per_expert_whatever_the_size():
    assert per_expert_wanted(16, FINE_GRAINED_W2, "cublas")


def test_cpu_keeps_its_own_loop(monkeypatch):
    """Off the GPU nothing syncs for the split, so MoNTAGroupedMLP's loop stays as it is."""
    monkeypatch.setenv("MONTA_GROUPED_GEMM", "cublas")
    x, w2 = torch.randn(6, 4), torch.randn(2, 3, 4)
    assert per_expert_gemm.host_splits(x, w2, torch.tensor([2, 4])) is None


def test_counts_off_the_gpu_are_not_prefetched():
    """The counts' early host copy (prefetch_host_counts) is for GPU counts only: host counts
    need none, and host_splits reads them as they are."""
    counts = torch.tensor([2, 4])
    per_expert_gemm.prefetch_host_counts(counts, 6, (2, 3, 4))
    assert not hasattr(counts, "host_copy")


def test_host_splits_are_read_once_and_shared_by_both_projections():
    """HostSplits reads the counts at the first GEMM's need (PerExpertMM, after it allocated its
    output) and hands fc2 the same list; the FFN equals the per-expert fp64 loop."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([2, 0, 4])
    splits = per_expert_gemm.HostSplits(counts, 6, 3)
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    w1 = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    w2 = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen)
    out = per_expert_mm(per_expert_mm(x, w1, splits), w2, splits)
    first = splits.get()
    assert first == [2, 0, 4] and splits.get() is first
    want = torch.cat([x[:2] @ w1[0] @ w2[0], x[2:] @ w1[2] @ w2[2]])
    torch.testing.assert_close(out, want)


def test_host_splits_that_do_not_cover_the_rows_are_refused():
    with pytest.raises(ValueError, match="summing to the 7 rows"):
        per_expert_gemm.HostSplits(torch.tensor([2, 4]), 7, 2).get()
    with pytest.raises(ValueError, match="each of the 3 local experts"):
        per_expert_gemm.HostSplits(torch.tensor([2, 4]), 6, 3).get()
