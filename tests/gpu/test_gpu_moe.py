"""GPU tier (run on a CUDA machine; skipped elsewhere): NCCL, bf16, the MoNTA dispatcher, the
grouped-GEMM experts (``torch._grouped_mm``) and their host-sync-free MoE layer.

    python -m pytest tests/gpu -m gpu -v        # on a machine with one or more GPUs
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def nccl_world_of_one():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from monta.compat import apply_cpu_patches

    apply_cpu_patches()  # on a GPU host: only the fixes that also bite without TE
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel()
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _moe_layer(dispatcher: str, options=None, topk: int = 2, grouped: bool = False,
               aux_loss: bool = False):
    import torch.nn.functional as F
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from monta.model import gpt_moe_layer_spec

    config = TransformerConfig(
        num_layers=1, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
        num_moe_experts=8, moe_router_topk=topk,
        moe_router_load_balancing_type="aux_loss" if aux_loss else "none",
        moe_aux_loss_coeff=1e-2 if aux_loss else 0.0,
        moe_token_dispatcher_type=dispatcher, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, bf16=True, params_dtype=torch.bfloat16,
        normalization="RMSNorm", bias_activation_fusion=False, moe_grouped_gemm=grouped)
    if options is not None:
        config.monta_dispatch = options
    torch.manual_seed(0)
    layer = build_module(gpt_moe_layer_spec(config, use_te=False).submodules.mlp, config=config,
                         pg_collection=get_default_pg_collection())
    return layer.cuda()


def test_monta_dispatcher_bf16_matches_stock_on_gpu(nccl_world_of_one):
    from monta.dispatch.monta_dispatcher import DispatchOptions

    stock = _moe_layer("alltoall")
    monta = _moe_layer("monta", DispatchOptions(node_dedup="on", chunks=2))
    monta.load_state_dict(stock.state_dict())
    x = torch.randn(512, 2, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    results = []
    for layer in (stock, monta):
        inp = x.clone().requires_grad_(True)
        out, _ = layer(inp)
        out.backward(grad)
        results.append((out.float(), inp.grad.float(),
                        {n: p.grad.float() for n, p in layer.named_parameters()}))
    (out_s, gin_s, g_s), (out_m, gin_m, g_m) = results
    assert out_m.device.type == "cuda" and out_s.abs().max() > 0.01
    torch.testing.assert_close(out_m, out_s, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gin_m, gin_s, rtol=2e-2, atol=2e-2)
    assert g_m.keys() == g_s.keys() and len(g_m) >= 3
    for name in g_s:
        torch.testing.assert_close(g_m[name], g_s[name], rtol=5e-2, atol=5e-2, msg=name)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


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
    assert _rel_err(out, ref) < 1e-2
    assert _rel_err(xg.grad, xr.grad) < 1e-2
    busy = counts.cpu() > 0
    assert _rel_err(wg.grad[busy], wr.grad[busy]) < 1e-2
    assert torch.count_nonzero(wg.grad[~busy]) == 0, "an empty expert got a weight gradient"


def test_swiglu_triton_kernels_match_fp64(nccl_world_of_one):
    """monta/swiglu.py compiled on the GPU: Mixtral's width, one not a multiple of the block,
    no rows."""
    import torch.nn.functional as F

    from monta.experts import activation_with_probs

    for n, f in ((2048, 14336), (300, 1100), (0, 64)):
        gen = torch.Generator(device="cuda").manual_seed(n)
        h = torch.randn(n, 2 * f, device="cuda", generator=gen).bfloat16()
        p = torch.rand(n, 1, device="cuda", generator=gen)
        dy = torch.randn(n, f, device="cuda", generator=gen).bfloat16()
        h1, p1 = h.clone().requires_grad_(True), p.clone().requires_grad_(True)
        y1 = activation_with_probs(h1, p1, F.silu, True, impl="triton")
        y1.backward(dy)
        h2, p2 = h.double().requires_grad_(True), p.double().requires_grad_(True)
        gate, up = torch.chunk(h2, 2, dim=-1)
        y2 = F.silu(gate) * up * p2
        y2.backward(dy.double())
        assert y1.dtype == torch.bfloat16 and y1.shape == (n, f)
        if n:
            for got, want in ((y1, y2), (h1.grad, h2.grad), (p1.grad, p2.grad)):
                assert _rel_err(got, want) < 1e-2, (n, f)


def _topk_mask(tokens: int, experts: int, topk: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, experts, device="cuda", generator=gen)
    mask = torch.zeros(tokens, experts, dtype=torch.bool, device="cuda")
    return mask.scatter_(1, logits.topk(topk, dim=1).indices, True)


def test_expert_order_kernel_matches_torch(nccl_world_of_one):
    """monta/dispatch/kernels.py's two-launch expert order = the torch version: the same rows,
    experts and counts; each token's copies at the same rows (their j order may differ)."""
    from monta.dispatch.plan import order_by_expert_topk

    for tokens, experts, topk in ((8192, 8, 2), (1000, 64, 6), (77, 16, 1), (0, 8, 2),
                                  (20000, 256, 8)):  # 1250 blocks: the scan in many chunks
        mask = _topk_mask(tokens, experts, topk, seed=tokens)
        got = order_by_expert_topk(mask, topk)
        want = order_by_expert_topk(mask, topk, use_kernel=False)
        for name in ("rows", "experts", "flat", "tokens_per_expert"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (tokens, name)
        assert torch.equal(got.inverse.view(-1, topk).sort(1).values,
                           want.inverse.view(-1, topk).sort(1).values)
        assert torch.equal(got.rows[got.inverse], torch.arange(tokens, device="cuda")
                           .repeat_interleave(topk))


def test_expert_order_kernel_pads_short_rows(nccl_world_of_one):
    """Rows with fewer than top-k selected experts (not from megatron's dropless router) get
    extra copies to unselected experts, as the torch version does: still a permutation."""
    from monta.dispatch.plan import order_by_expert_topk

    mask = _topk_mask(300, 16, 4, seed=5)
    mask[7] = False
    mask[8, :] = False
    mask[8, 15] = True
    order = order_by_expert_topk(mask, 4)
    n = 300 * 4
    assert int(order.tokens_per_expert.sum()) == n
    assert torch.equal(order.inverse.sort().values, torch.arange(n, device="cuda"))
    tokens = torch.arange(300, device="cuda").repeat_interleave(4)
    assert torch.equal(order.rows[order.inverse], tokens)
    chosen = torch.zeros_like(mask).index_put_((order.rows, order.experts),
                                               torch.ones(n, dtype=torch.bool, device="cuda"))
    assert bool(chosen[mask].all()) and int(chosen.sum()) == n  # selected ones all kept
    assert torch.equal(order.flat, order.rows * 16 + order.experts)


def test_topk_softmax_order_kernel_matches_torch(nccl_world_of_one):
    """monta/dispatch/kernels.py's two-launch router top-k + softmax + expert order (through
    routed_order.route_in_expert_order) = the torch version on CPU: the same order, the same
    probabilities, the same logits gradient; twice in a row (the ticket counter resets); up to
    1250 routing blocks (256 experts), so the block scan runs in many chunks."""
    from monta.dispatch.routed_order import route_in_expert_order

    for tokens, experts, topk, dtype in ((8192, 8, 2, torch.bfloat16), (1000, 64, 6, torch.float32),
                                         (77, 16, 1, torch.bfloat16), (0, 8, 2, torch.bfloat16),
                                         (20000, 256, 8, torch.float32)):
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        if dtype == torch.bfloat16:  # distinct within a row, exact in bf16: no ties to break
            logits = torch.rand(tokens, experts, device="cuda", generator=gen).argsort(1) / 4
        else:
            logits = torch.randn(tokens, experts, device="cuda", generator=gen)
        logits = logits.to(dtype)
        weights = torch.randn(tokens * topk, device="cuda", generator=gen).to(dtype)
        want_logits = logits.cpu().float().requires_grad_(True)
        want_probs, want = route_in_expert_order(want_logits, topk)
        (want_probs.to(dtype).float() * weights.cpu().float()).sum().backward()
        for _ in range(2):
            got_logits = logits.clone().requires_grad_(True)
            probs, got = route_in_expert_order(got_logits, topk)
            (probs * weights).sum().backward()
            for name in ("rows", "experts", "flat", "inverse", "tokens_per_expert"):
                assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), (tokens, name)
            assert probs.dtype == dtype
            if tokens:  # the experts' row ends come from the same launch (monta.experts)
                assert torch.equal(got.tokens_per_expert.row_ends.cpu(),
                                   want.tokens_per_expert.cumsum(0).int())
                tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
                assert _rel_err(probs.float().cpu(), want_probs.to(dtype).float()) < tol
                err = (got_logits.grad.float().cpu() - want_logits.grad).norm()
                assert err <= tol * want_logits.grad.norm() + 1e-6  # top-1: both zero


def test_gather_sum_kernel_matches_torch(nccl_world_of_one):
    from monta.dispatch import kernels

    for tokens, topk, hidden, dtype in ((4096, 2, 4096, torch.bfloat16),
                                        (333, 6, 1100, torch.float32), (0, 2, 64, torch.bfloat16)):
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        y = torch.randn(tokens * topk, hidden, device="cuda", generator=gen).to(dtype)
        index = torch.randperm(tokens * topk, device="cuda", generator=gen)
        got = kernels.gather_sum(y, index, topk)
        want = y.float()[index].view(tokens, topk, hidden).sum(1)
        assert got.dtype == dtype and got.shape == (tokens, hidden)
        if tokens:
            assert _rel_err(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_grouped_experts_layer_matches_sequential_bf16(nccl_world_of_one):
    """MoNTA's MoE layer with grouped experts and the one-rank dispatcher path vs megatron's
    alltoall + SequentialMLP, same weights, bf16."""
    from monta.experts import MoNTAGroupedMLP, copy_from_sequential

    stock = _moe_layer("alltoall")
    ours = _moe_layer("monta", grouped=True)
    assert isinstance(ours.experts, MoNTAGroupedMLP) and ours.token_dispatcher.static_order
    assert ours.router.routes_in_expert_order()  # top-k straight into the order (router.py)
    ours.router.load_state_dict(stock.router.state_dict())
    copy_from_sequential(ours.experts, stock.experts)
    x = torch.randn(512, 2, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    results = []
    for layer in (stock, ours):
        inp = x.clone().requires_grad_(True)
        out, _ = layer(inp)
        out.backward(grad)
        results.append((out, inp.grad, layer.router.weight.grad))
    (out_s, gin_s, gr_s), (out_m, gin_m, gr_m) = results
    assert out_s.abs().max() > 0.01
    assert _rel_err(out_m, out_s) < 2e-2
    assert _rel_err(gin_m, gin_s) < 2e-2
    assert _rel_err(gr_m, gr_s) < 5e-2


def test_grouped_moe_layer_has_no_host_sync(nccl_world_of_one):
    """Router (its aux loss deferred, monta/router.py), MoNTA's one-rank dispatch, grouped
    experts and combine, forward and backward: no operation waits for the GPU (torch's sync
    debug mode reports each one that does)."""
    layer = _moe_layer("monta", grouped=True, aux_loss=True)
    assert layer._defers_aux_loss(None) and layer.router.routes_in_expert_order()
    x = torch.randn(512, 2, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    for _ in range(2):  # compile the fused activation and warm the allocator first
        layer(x)[0].backward(grad)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            layer(x)[0].backward(grad)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in caught
             if "called a synchronizing" in str(w.message)]
    assert not syncs, "\n".join(syncs)


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


@pytest.mark.parametrize("fuse_backward", [False, True])
@pytest.mark.parametrize("ffn", [384, 1096])
def test_fused_swiglu_expert_ffn_matches_fp64(nccl_world_of_one, ffn, fuse_backward):
    """monta/swiglu_gemm.py: fc1 with SwiGLU·prob in its epilogue and (or not) fc2's input
    gradient with the activation's backward in its epilogue, against an fp64 FFN: output and
    the gradients of x, both weights and the probabilities; uneven and empty experts, an FFN
    width that is (1096) and is not (384) a multiple of the column tile."""
    import torch.nn.functional as F

    from monta import swiglu_gemm

    counts = torch.tensor([300, 0, 17, 0, 1000, 1, 0, 129], device="cuda")
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(ffn)
    n, hidden = int(counts.sum()), 256
    x = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16()
    w1 = (torch.randn(8, hidden, 2 * ffn, device="cuda", generator=gen) / 16).bfloat16()
    w2 = (torch.randn(8, ffn, hidden, device="cuda", generator=gen) / ffn ** 0.5).bfloat16()
    probs = torch.rand(n, 1, device="cuda", generator=gen)
    dout = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16()
    assert swiglu_gemm.supported(x, w1, w2)
    fused = [t.clone().requires_grad_(True) for t in (x, w1, w2, probs)]
    out = swiglu_gemm.swiglu_expert_ffn(*fused, ends, fuse_backward=fuse_backward)
    out.backward(dout)
    ref = [t.double().requires_grad_(True) for t in (x, w1, w2, probs)]
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    pieces = []
    for e, (a, b) in enumerate(zip(starts, starts[1:])):
        gate, up = torch.chunk(ref[0][a:b] @ ref[1][e], 2, dim=-1)
        pieces.append((F.silu(gate) * up * ref[3][a:b]) @ ref[2][e])
    want = torch.cat(pieces)
    want.backward(dout.double())
    assert out.dtype == torch.bfloat16 and _rel_err(out, want) < 1e-2
    busy = counts > 0
    for name, got, wanted in (("x", fused[0].grad, ref[0].grad), ("probs", fused[3].grad,
                                                                   ref[3].grad),
                              ("w1", fused[1].grad[busy], ref[1].grad[busy]),
                              ("w2", fused[2].grad[busy], ref[2].grad[busy])):
        assert _rel_err(got, wanted) < 1e-2, name
    for grad in (fused[1].grad, fused[2].grad):
        assert torch.count_nonzero(grad[~busy]) == 0, "an empty expert got a weight gradient"


def _monta_layer_under(monkeypatch, variable: str, values) -> list:
    """(output, input gradient, {parameter: gradient}) of one MoNTA grouped layer, the same
    input and output gradient, with ``variable`` set to each of ``values`` in turn."""
    layer = _moe_layer("monta", grouped=True)
    x = torch.randn(512, 2, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    results = []
    for value in values:
        monkeypatch.setenv(variable, value)
        layer.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        out = layer(inp)[0]
        out.backward(grad)
        results.append((out, inp.grad, {k: p.grad for k, p in layer.named_parameters()}))
    return results


def _assert_same_to_bf16(got, want):
    (out1, dx1, g1), (out0, dx0, g0) = got, want
    assert out0.abs().max() > 0.01
    assert _rel_err(out1, out0) < 1e-2 and _rel_err(dx1, dx0) < 1e-2
    assert g1.keys() == g0.keys()
    for name in g1:
        assert _rel_err(g1[name], g0[name]) < 2e-2, name


def test_moe_layer_fused_swiglu_matches_unfused(nccl_world_of_one, monkeypatch):
    """The grouped experts inside MoNTA's layer take the fused path by default (``fwd``) and
    under ``all``; both agree with MONTA_FUSED_SWIGLU=0 (the activation as its own kernels) to
    bf16 precision, in the output and every parameter's gradient."""
    from monta import swiglu_gemm

    calls = []
    real = swiglu_gemm.swiglu_expert_ffn
    monkeypatch.setattr(swiglu_gemm, "swiglu_expert_ffn",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    *fused, unfused = _monta_layer_under(monkeypatch, "MONTA_FUSED_SWIGLU", ("fwd", "all", "0"))
    assert len(calls) == 2, "the fused path ran other than once per fused setting"
    for result in fused:
        _assert_same_to_bf16(result, unfused)


def test_moe_layer_per_expert_gemms_match_grouped(nccl_world_of_one, monkeypatch):
    """MONTA_GROUPED_GEMM=cublas runs MoNTA's layer on one cuBLAS GEMM per expert
    (monta/per_expert_gemm.py) with one host sync (the counts), and agrees with the grouped
    kernels in the output and every parameter's gradient; the small experts here stay grouped
    by default."""
    from monta import per_expert_gemm

    calls = []
    real = per_expert_gemm.per_expert_mm
    monkeypatch.setattr(per_expert_gemm, "per_expert_mm",
                        lambda *args: calls.append(args[2]) or real(*args))
    per_expert, grouped = _monta_layer_under(monkeypatch, "MONTA_GROUPED_GEMM",
                                             ("cublas", "default"))
    assert len(calls) == 2, "per-expert GEMMs ran other than for fc1 and fc2 under cublas"
    assert sum(calls[0]) == 2048 and len(calls[0]) == 8  # 1024 tokens, top-2, 8 experts
    _assert_same_to_bf16(per_expert, grouped)


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
    assert _rel_err(out, torch.cat(_loop_reference(x, w, counts))) < 1e-2
    dx = rows(dy, w.transpose(1, 2), ends)
    assert _rel_err(dx, torch.cat(_loop_reference(dy, w.transpose(1, 2), counts))) < 1e-2
    dw = wgrad(x, dy, ends, torch.full_like(w, float("nan")))  # every element written
    assert dw.stride() == w.stride()
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    for e in range(8):
        want = x[starts[e]:starts[e + 1]].double().t() @ dy[starts[e]:starts[e + 1]].double()
        if counts[e] == 0:
            assert torch.count_nonzero(dw[e]) == 0
        else:
            assert _rel_err(dw[e], want) < 1e-2


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
        assert _rel_err(got, want) < 1e-2
    default = expert_gemm._pin(x)
    if pin == "auto" or default != "torch":
        assert {key[0] for key in expert_gemm.choices()} == {"rows", "wgrad"}
        assert len(expert_gemm.choices()) == 3  # forward, input gradient, weight gradient
    if pin == "default":
        assert set(expert_gemm.choices().values()) <= {default, "torch"}
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
        assert _rel_err(out, want) < 1e-2, config
        dx = sm90_gemm.rows(dy, w.transpose(1, 2), ends, config,
                            out=torch.full_like(x, float("nan")))
        assert _rel_err(dx, want_dx) < 1e-2, config
        dw = sm90_gemm.wgrad(x, dy, ends, config, w, out=torch.full_like(w, float("nan")))
        assert dw.shape == w.shape and dw.stride() == w.stride()
        for e, (a, b) in enumerate(zip(starts, starts[1:])):
            if a == b:  # an expert without rows: exactly zero, whatever the memory held
                assert torch.count_nonzero(dw[e]) == 0, (config, e)
            else:
                assert _rel_err(dw[e], x[a:b].double().t() @ dy[a:b].double()) < 1e-2, (config, e)


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
        assert _rel_err(out[position], want) < 1e-2, config
        assert not out[:int(ends[-1])].isnan().any(), config  # pad rows written too
        dx = sm90_gemm.rows(dyp, w.transpose(1, 2), ends, config, aligned=True)
        assert _rel_err(dx[position], want_dx) < 1e-2, config
        if not sm90_gemm.aligned_wgrad_built(config):  # ping-pong configs: row GEMMs only
            continue
        dw = sm90_gemm.wgrad(xp, dyp, ends, config, w, out=torch.full_like(w, float("nan")),
                             aligned=True)
        assert dw.shape == w.shape and dw.stride() == w.stride()
        for e, (a, b) in enumerate(zip(starts, starts[1:])):
            if a == b:
                assert torch.count_nonzero(dw[e]) == 0, (config, e)
            else:
                assert _rel_err(dw[e], x[a:b].double().t() @ dy[a:b].double()) < 1e-2, (config, e)
