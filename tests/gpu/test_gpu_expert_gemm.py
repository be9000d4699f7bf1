"""GPU tier (run on a CUDA machine; skipped elsewhere): the experts' grouped GEMMs against fp64
per-expert loops — ``monta.experts.grouped_mm`` on ``torch._grouped_mm``, MoNTA's Triton kernels
(``monta/grouped_gemm.py``), its CUTLASS library (``monta/sm90_gemm.py``, row-masked and
tile-aligned) and the choice between them (``monta/expert_gemm.py``) — on uneven and empty
experts.

    python -m pytest tests/gpu -m gpu -v        # on a machine with one or more GPUs
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.gpu.conftest import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_grouped_mm_bf16_matches_fp32_loop_with_empty_experts(nccl_world_of_one):
    from monta.experts import grouped_mm, grouped_mm_supported

    counts = torch.tensor([300, 0, 17, 0, 0, 1000, 1, 0], device="cuda")  # empty experts
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(int(counts.sum()), 256, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(8, 256, 384, device="cuda", generator=gen) / 16).bfloat16()
    grad = torch.randn(x.size(0), 384, device="cuda", generator=gen).bfloat16()
    assert grouped_mm_supported(x, w)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = grouped_mm(xg, wg, counts)  # torch._grouped_mm, offsets on the device
    out.backward(grad)
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = grouped_mm(xr, wr, counts.cpu(), force_loop=True)
    ref.backward(grad.double())
    assert rel_err(out, ref) < 1e-2
    assert rel_err(xg.grad, xr.grad) < 1e-2
    busy = counts.cpu() > 0
    assert rel_err(wg.grad[busy], wr.grad[busy]) < 1e-2
    assert torch.count_nonzero(wg.grad[~busy]) == 0, "an empty expert got a weight gradient"


def _loop_reference(x, w, counts):
    """fp64 per-expert products: the forward, and the input / weight gradients for ``dy``."""
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    return [x[a:b].double() @ w[e].double() for e, (a, b) in enumerate(zip(starts, starts[1:]))]


def _uneven_experts_problem(layout: str, seed: int):
    """8 experts with uneven and empty row counts (1447 rows, no multiple of any tile), K 256,
    N 384: counts, int32 row ends, x, dy and weights stored [E, K, N] ("row") or [E, N, K]
    ("col", as a transposed view)."""
    counts = torch.tensor([300, 0, 17, 0, 1000, 1, 0, 129], device="cuda")
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n, k, cols = int(counts.sum()), 256, 384
    x = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
    dy = torch.randn(n, cols, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(8, k, cols, device="cuda", generator=gen) / 16).bfloat16()
    if layout == "col":
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    return counts, ends, x, dy, w


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("tma", [False, True])
def test_triton_grouped_gemm_kernels_match_fp64(nccl_world_of_one, layout, tma):
    """monta/grouped_gemm.py: forward/input-gradient and weight-gradient kernels, weights
    stored [E, K, N] ("row") or [E, N, K] ("col"), uneven and empty experts, a row count that
    is no multiple of any tile, against fp64 loops."""
    from monta import grouped_gemm as gg

    counts, ends, x, dy, w = _uneven_experts_problem(layout, seed=0)
    rows = gg.rows_mm_tma if tma else gg.rows_mm
    wgrad = gg.wgrad_mm_tma if tma else gg.wgrad_mm
    if tma:
        assert gg.tma_supported(x, w) and gg.tma_supported(dy, w.transpose(1, 2))
    out = rows(x, w, ends)
    assert rel_err(out, torch.cat(_loop_reference(x, w, counts))) < 1e-2
    dx = rows(dy, w.transpose(1, 2), ends)
    assert rel_err(dx, torch.cat(_loop_reference(dy, w.transpose(1, 2), counts))) < 1e-2
    dw = wgrad(x, dy, ends, torch.full_like(w, float("nan")))  # every element written
    assert dw.stride() == w.stride()
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    for e in range(8):
        want = x[starts[e]:starts[e + 1]].double().t() @ dy[starts[e]:starts[e + 1]].double()
        if counts[e] == 0:
            assert torch.count_nonzero(dw[e]) == 0
        else:
            assert rel_err(dw[e], want) < 1e-2


@pytest.mark.parametrize("pin", ["default", "auto"])
def test_grouped_mm_matches_torch_and_stays_sync_free(nccl_world_of_one, monkeypatch, pin):
    """monta/expert_gemm.py: by default nothing is timed (the row GEMMs run on the sm90
    library's default config when it is built); with MONTA_GROUPED_GEMM=auto the first call
    tunes each GEMM. Either way the result and both gradients match torch._grouped_mm's, every
    GEMM has a choice, and later calls wait for nothing."""
    from monta import expert_gemm

    monkeypatch.setattr(expert_gemm, "_chosen", {})
    monkeypatch.setenv("MONTA_GROUPED_GEMM", pin)
    if pin == "default":
        def no_timing(fn):
            raise AssertionError("the default kernel choice timed a candidate")
        monkeypatch.setattr(expert_gemm, "_time_ms", no_timing)
    counts = torch.tensor([700, 0, 513, 64, 0, 1200, 3, 560], device="cuda")
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(int(counts.sum()), 512, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(8, 512, 1024, device="cuda", generator=gen) / 22).bfloat16()
    dy = torch.randn(x.size(0), 1024, device="cuda", generator=gen).bfloat16()
    grads = []
    for fn in (expert_gemm.grouped_mm, lambda a, b, o: torch._grouped_mm(a, b, offs=o)):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(xg, wg, ends)
        out.backward(dy)
        grads.append((out, xg.grad, wg.grad))
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-2
    default = expert_gemm._pin(x, ends)
    if pin == "auto" or default != "torch":
        # forward, input gradient, weight gradient
        assert sorted(key[0] for key in expert_gemm.choices()) == ["dgrad", "rows", "wgrad"]
    if pin == "default":  # each GEMM on the default's config for it, nothing tuned
        for key, choice in expert_gemm.choices().items():
            assert (choice,) == expert_gemm._candidates(key[0], default, sm90=True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            xg = x.clone().requires_grad_(True)
            expert_gemm.grouped_mm(xg, w.clone().requires_grad_(True), ends).backward(dy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "called a synchronizing" in str(w.message)]


@pytest.mark.parametrize("layout", ["row", "col"])
def test_sm90_grouped_gemm_configs_match_fp64(nccl_world_of_one, layout):
    """monta/sm90_gemm.py (CUTLASS, built by tools/build_sm90_kernels.py): every config, weights
    stored [E, K, N] or [E, N, K], uneven and empty experts, a row count that is no multiple of
    any tile, against fp64 loops; the input gradient through the transposed view, the weight
    gradient in the weights' strides (zero for empty experts)."""
    from monta import sm90_gemm

    probe = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    if not sm90_gemm.available(probe):
        pytest.skip("sm90 grouped-GEMM library not built or not a Hopper GPU")
    counts, ends, x, dy, w = _uneven_experts_problem(layout, seed=1)
    want = torch.cat(_loop_reference(x, w, counts))
    want_dx = torch.cat(_loop_reference(dy, w.transpose(1, 2), counts))
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    for config in sm90_gemm.built_configs():  # NaN-filled outputs: every row must be written
        out = sm90_gemm.rows(x, w, ends, config, out=torch.full_like(dy, float("nan")))
        assert rel_err(out, want) < 1e-2, config
        dx = sm90_gemm.rows(dy, w.transpose(1, 2), ends, config,
                            out=torch.full_like(x, float("nan")))
        assert rel_err(dx, want_dx) < 1e-2, config
        dw = sm90_gemm.wgrad(x, dy, ends, config, w, out=torch.full_like(w, float("nan")))
        assert dw.shape == w.shape and dw.stride() == w.stride()
        for e, (a, b) in enumerate(zip(starts, starts[1:])):
            if a == b:  # an expert without rows: exactly zero, whatever the memory held
                assert torch.count_nonzero(dw[e]) == 0, (config, e)
            else:
                assert rel_err(dw[e], x[a:b].double().t() @ dy[a:b].double()) < 1e-2, (config, e)


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("k", [64, 320])  # one k tile (the mainloop's first only), five
def test_sm90_experts_ending_at_every_tile_edge_match_fp64_one_by_one(nccl_world_of_one, layout,
                                                                      k):
    """Experts ending on each side of 64 and 128 rows in their last row tile, and with 1 to 4
    16-row k blocks in the weight gradient's last k tile, for every config: each expert against
    fp64 on its own (a 1-row expert's error would vanish in a total), NaN-filled outputs (every
    row written)."""
    from monta import sm90_gemm

    probe = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    if not sm90_gemm.available(probe):
        pytest.skip("sm90 grouped-GEMM library not built or not a Hopper GPU")
    counts = torch.tensor([1, 63, 64, 65, 0, 127, 128, 129, 191, 192, 193, 320, 17, 40, 100, 81],
                          device="cuda")
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(5)
    n, cols, experts = int(counts.sum()), 256, counts.numel()
    x = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
    dy = torch.randn(n, cols, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(experts, k, cols, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    if layout == "col":
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    want = _loop_reference(x, w, counts)
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    for config in sm90_gemm.built_configs():
        out = sm90_gemm.rows(x, w, ends, config, out=torch.full(
            (n, cols), float("nan"), device="cuda", dtype=torch.bfloat16))
        grad = sm90_gemm.wgrad(x, dy, ends, config, w, out=torch.full_like(w, float("nan")))
        for e, (a, b) in enumerate(zip(starts, starts[1:])):
            if a == b:
                assert torch.count_nonzero(grad[e]) == 0, (config, e)
                continue
            assert rel_err(out[a:b], want[e]) < 1e-2, (config, int(counts[e]))
            assert rel_err(grad[e], x[a:b].double().t() @ dy[a:b].double()) < 1e-2, \
                (config, int(counts[e]))


def _padded(counts: torch.Tensor, alignment: int, *tensors: torch.Tensor):
    """Each expert's rows moved to start at a multiple of ``alignment`` (monta/dispatch/
    padded_order.py): (padded int32 ends, positions of the real rows, the tensors laid out so,
    pad rows random for the first tensor, zero for the others, rows past the ends NaN)."""
    from monta.dispatch.padded_order import padded_capacity, padded_positions

    position, ends = padded_positions(counts, alignment)
    # a few rows past the worst case
    capacity = padded_capacity(int(counts.sum()), counts.numel(), alignment) + 5
    end = int(ends[-1])
    laid = []
    for i, t in enumerate(tensors):
        out = torch.randn(capacity, t.size(1), device="cuda").to(t.dtype) if i == 0 else \
            torch.zeros(capacity, t.size(1), device="cuda", dtype=t.dtype)
        out[end:] = float("nan")
        laid.append(out.index_copy_(0, position, t))
    return ends, position, laid


@pytest.mark.parametrize("layout", ["row", "col"])
def test_sm90_aligned_gemm_configs_match_fp64(nccl_world_of_one, layout):
    """monta/csrc/sm90_aligned_gemm.cuh: every tile-aligned config on the uneven experts of
    the test above laid out with each expert's rows starting at a multiple of the config's
    tile rows; real rows against fp64 loops, the weight gradient (cooperative configs) zero for
    empty experts and untouched by pad rows whose gradient is zero, NaN rows past the padded
    ends never read."""
    from monta import sm90_gemm

    probe = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    if not sm90_gemm.available(probe) or not sm90_gemm.built_configs(aligned=True):
        pytest.skip("sm90 aligned grouped-GEMM kernels not built or not a Hopper GPU")
    from monta.dispatch.padded_order import padded_positions
    from monta.experts import expert_offsets

    counts, _, x, dy, w = _uneven_experts_problem(layout, seed=2)
    padded_counts = counts.clone()
    padded_counts.row_ends = padded_positions(counts, 128)[1]
    # the padded ends reach the GEMMs whatever the caller calls the device ("cuda", "cuda:0")
    assert expert_offsets(padded_counts, torch.device("cuda")) is padded_counts.row_ends
    want = torch.cat(_loop_reference(x, w, counts))
    want_dx = torch.cat(_loop_reference(dy, w.transpose(1, 2), counts))
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    for config in sm90_gemm.built_configs(aligned=True):
        ends, position, (xp, dyp) = _padded(counts, sm90_gemm.row_alignment(config), x, dy)
        out = sm90_gemm.rows(xp, w, ends, config, aligned=True,
                             out=torch.full((xp.size(0), w.size(2)), float("nan"),
                                            device="cuda", dtype=x.dtype))
        assert rel_err(out[position], want) < 1e-2, config
        assert not out[:int(ends[-1])].isnan().any(), config  # pad rows written too
        dx = sm90_gemm.rows(dyp, w.transpose(1, 2), ends, config, aligned=True)
        assert rel_err(dx[position], want_dx) < 1e-2, config
        if not sm90_gemm.aligned_wgrad_built(config):  # ping-pong configs: row GEMMs only
            continue
        dw = sm90_gemm.wgrad(xp, dyp, ends, config, w, out=torch.full_like(w, float("nan")),
                             aligned=True)
        assert dw.shape == w.shape and dw.stride() == w.stride()
        for e, (a, b) in enumerate(zip(starts, starts[1:])):
            if a == b:
                assert torch.count_nonzero(dw[e]) == 0, (config, e)
            else:
                assert rel_err(dw[e], x[a:b].double().t() @ dy[a:b].double()) < 1e-2, (config, e)
