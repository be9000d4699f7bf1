"""GPU tier (run on a CUDA machine; skipped elsewhere): NCCL, bf16, the MoNTA dispatcher, its
routing and ordering kernels, the fused SwiGLU, and the grouped-GEMM experts' host-sync-free MoE
layer. The grouped-GEMM kernels themselves are tested in ``test_gpu_expert_gemm.py``.

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
                assert rel_err(got, want) < 1e-2, (n, f)


def test_swiglu_backward_reads_paired_h_as_megatron_h(nccl_world_of_one):
    """The backward on ``h`` paired in runs of 64 columns (how the sm90 fused fc1 writes it)
    gives exactly the gradients of the same ``h`` in megatron's layout."""
    from monta import swiglu

    gen = torch.Generator(device="cuda").manual_seed(3)
    n, f = 300, 1408
    h = torch.randn(n, 2 * f, device="cuda", generator=gen).bfloat16()
    p = torch.rand(n, 1, device="cuda", generator=gen)
    dy = torch.randn(n, f, device="cuda", generator=gen).bfloat16()
    paired = swiglu.pair(h, 64)
    assert not torch.equal(paired, h) and torch.equal(swiglu.unpair(paired, 64), h)
    dh, dp = swiglu.weighted_swiglu_backward(paired, p, dy, paired=64)
    want_dh, want_dp = swiglu.weighted_swiglu_backward(h, p, dy)
    assert torch.equal(dh, want_dh) and torch.equal(dp, want_dp)


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
                assert rel_err(probs.float().cpu(), want_probs.to(dtype).float()) < tol
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
            assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)


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
    assert rel_err(out_m, out_s) < 2e-2
    assert rel_err(gin_m, gin_s) < 2e-2
    assert rel_err(gr_m, gr_s) < 5e-2


def test_grouped_moe_layer_has_no_host_sync(nccl_world_of_one):
    """Router (its aux loss deferred, monta/router.py), MoNTA's one-rank dispatch, grouped
    experts and combine, forward and backward: no operation waits for the GPU (torch's sync
    debug mode reports each one that does)."""
    layer = _moe_layer("monta", grouped=True, aux_loss=True)
    assert layer._defers_aux_loss(None) and layer.router.routes_in_expert_order()
    x = torch.randn(512, 2, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    syncs = _synchronizing_ops(lambda: layer(x)[0].backward(grad))
    assert not syncs, "\n".join(syncs)


def _synchronizing_ops(step) -> list[str]:
    """Where ``step()`` waited for the GPU through a stream or device sync (torch's sync debug
    mode), after two warm-up calls (kernel compilation, allocator)."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in caught
            if "called a synchronizing" in str(w.message)]


@pytest.mark.parametrize("passes", ["fwd", "all", "bwd"])
@pytest.mark.parametrize("ffn", [384, 1096])
def test_fused_swiglu_expert_ffn_matches_fp64(nccl_world_of_one, ffn, passes):
    """monta/swiglu_gemm.py: SwiGLU·prob in fc1's forward epilogue (``fwd``), also its backward
    in fc2's input gradient (``all``; Triton), or only the backward, in the epilogue of the sm90
    library's kernel (``bwd``), against an fp64 FFN: output and the gradients of x, both weights
    and the probabilities; uneven and empty experts, an FFN width that is (384) and is not
    (1096) a multiple of the column tile."""
    import torch.nn.functional as F

    from monta import sm90_gemm, swiglu_gemm

    counts = torch.tensor([300, 0, 17, 0, 1000, 1, 0, 129], device="cuda")
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(ffn)
    n, hidden = int(counts.sum()), 256
    x = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16()
    w1 = (torch.randn(8, hidden, 2 * ffn, device="cuda", generator=gen) / 16).bfloat16()
    w2 = (torch.randn(8, ffn, hidden, device="cuda", generator=gen) / ffn ** 0.5).bfloat16()
    probs = torch.rand(n, 1, device="cuda", generator=gen)
    dout = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16()
    if passes == "bwd" and not swiglu_gemm.supported(x, w1, w2, passes):
        pytest.skip("the sm90 library with its SwiGLU input gradient is not built")
    assert swiglu_gemm.supported(x, w1, w2, passes, ends)
    # fwd runs on the sm90 fused fc1 where F fits its paired runs (384), else on Triton (1096)
    sm90_fc1 = swiglu_gemm.sm90_fc1_config(x, w1, ends)
    if passes == "fwd" and ffn % 64 == 0 and any(map(sm90_gemm.swiglu_fc1_built,
                                                      sm90_gemm.SWIGLU_FC1_CONFIGS)):
        assert sm90_fc1 is not None
    if ffn % 64:
        assert sm90_fc1 is None
    fused = [t.clone().requires_grad_(True) for t in (x, w1, w2, probs)]
    out = swiglu_gemm.swiglu_expert_ffn(*fused, ends, passes=passes)
    out.backward(dout)
    ref = [t.double().requires_grad_(True) for t in (x, w1, w2, probs)]
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    pieces = []
    for e, (a, b) in enumerate(zip(starts, starts[1:])):
        gate, up = torch.chunk(ref[0][a:b] @ ref[1][e], 2, dim=-1)
        pieces.append((F.silu(gate) * up * ref[3][a:b]) @ ref[2][e])
    want = torch.cat(pieces)
    want.backward(dout.double())
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < 1e-2
    busy = counts > 0
    for name, got, wanted in (("x", fused[0].grad, ref[0].grad), ("probs", fused[3].grad,
                                                                   ref[3].grad),
                              ("w1", fused[1].grad[busy], ref[1].grad[busy]),
                              ("w2", fused[2].grad[busy], ref[2].grad[busy])):
        assert rel_err(got, wanted) < 1e-2, name
    for grad in (fused[1].grad, fused[2].grad):
        assert torch.count_nonzero(grad[~busy]) == 0, "an empty expert got a weight gradient"


@pytest.mark.parametrize("config", ["128x128_pp_c1x2", "128x176_pp_c1x2"])
def test_sm90_swiglu_dgrad_matches_the_unfused_kernels(nccl_world_of_one, config):
    """monta/csrc/sm90_swiglu_dgrad.cuh against what it replaces: fc2's input gradient on the
    same sm90 kernel, then the Triton activation backward (monta/swiglu.py). Same d rounded to
    bf16 in both, so dh agrees to one bf16 rounding and dp to fp32 summation order; uneven
    and empty experts, a partial last column tile, rows past the last expert's end (dp zero
    there, dh not written)."""
    from monta import sm90_gemm, swiglu

    assert config in sm90_gemm.SWIGLU_DGRAD_CONFIGS
    if not sm90_gemm.swiglu_dgrad_built(config):
        pytest.skip("the sm90 library with its SwiGLU input gradient is not built")
    counts = torch.tensor([700, 0, 5, 128, 0, 257, 1, 63], device="cuda")
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(7)
    used, n, hidden, ffn = int(counts.sum()), int(counts.sum()) + 40, 512, 1096
    dout = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16()
    w2 = (torch.randn(8, ffn, hidden, device="cuda", generator=gen) / ffn ** 0.5).bfloat16()
    h = (2 * torch.randn(n, 2 * ffn, device="cuda", generator=gen)).bfloat16()
    probs = torch.rand(n, 1, device="cuda", generator=gen)
    dh, dp = sm90_gemm.swiglu_dgrad(dout, w2, h, probs, ends, config)
    d = sm90_gemm.rows(dout, w2.transpose(1, 2), ends, config)
    want_dh, want_dp = swiglu.weighted_swiglu_backward(h[:used], probs[:used], d[:used])
    assert dh.shape == h.shape and dp.shape == (n,) and dp.dtype == torch.float32
    assert rel_err(dh[:used], want_dh) < 5e-3
    assert (dh[:used].float() - want_dh.float()).abs().max() <= \
        want_dh.float().abs().max() * 2 ** -7, "dh differs by more than one bf16 rounding"
    assert rel_err(dp[:used], want_dp) < 1e-4
    assert torch.count_nonzero(dp[used:]) == 0, "rows past the last expert got a gradient"


@pytest.mark.parametrize("ffn", [1408, 192])
def test_sm90_swiglu_fc1_matches_the_unfused_kernels(nccl_world_of_one, ffn):
    """monta/csrc/sm90_swiglu_fc1.cuh against what it replaces: fc1's forward on the same sm90
    kernel, then the Triton activation forward (monta/swiglu.py). h comes out paired and, put
    back in megatron's layout, equal bit for bit (the same products in the same order); y
    agrees to one bf16 rounding (the hardware's tanh in the sigmoid). Uneven and empty experts,
    an odd number of column tiles for the 1x2 cluster (192), rows past the last expert's end."""
    from monta import sm90_gemm, swiglu

    config = sm90_gemm.SWIGLU_FC1_CONFIGS[0]
    if not sm90_gemm.swiglu_fc1_built(config):
        pytest.skip("the sm90 library with its fused fc1 is not built")
    counts = torch.tensor([700, 0, 5, 128, 0, 257, 1, 63], device="cuda")
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(ffn)
    used, n, hidden = int(counts.sum()), int(counts.sum()) + 40, 512
    x = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16()
    w1 = (torch.randn(8, hidden, 2 * ffn, device="cuda", generator=gen) / 16).bfloat16()
    probs = torch.rand(n, 1, device="cuda", generator=gen)
    h, y = sm90_gemm.swiglu_fc1(x, w1, probs, ends, config)
    width = sm90_gemm.paired_width(config)
    want_h = sm90_gemm.rows(x, w1, ends, config)[:used]
    want_y = swiglu.weighted_swiglu_forward(want_h, probs[:used])
    assert h.shape == (n, 2 * ffn) and y.shape == (n, ffn)
    assert torch.equal(swiglu.unpair(h[:used], width), want_h)
    assert rel_err(y[:used], want_y) < 5e-3
    assert (y[:used].float() - want_y.float()).abs().max() <= \
        want_y.float().abs().max() * 2 ** -7, "y differs by more than one bf16 rounding"


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
    assert rel_err(out1, out0) < 1e-2 and rel_err(dx1, dx0) < 1e-2
    assert g1.keys() == g0.keys()
    for name in g1:
        assert rel_err(g1[name], g0[name]) < 2e-2, name


def test_moe_layer_fused_swiglu_matches_unfused(nccl_world_of_one, monkeypatch):
    """The grouped experts inside MoNTA's layer take the fused path under ``fwd``, ``all`` and
    (with the sm90 library built) ``bwd``; each agrees with MONTA_FUSED_SWIGLU=0 (the
    activation as its own kernels) to bf16 precision, in the output and every parameter's
    gradient."""
    from monta import sm90_gemm, swiglu_gemm

    calls = []
    real = swiglu_gemm.swiglu_expert_ffn
    monkeypatch.setattr(swiglu_gemm, "swiglu_expert_ffn",
                        lambda *args, **kwargs: calls.append(kwargs["passes"])
                        or real(*args, **kwargs))
    settings = ["fwd", "all"]
    if any(map(sm90_gemm.swiglu_dgrad_built, sm90_gemm.SWIGLU_DGRAD_CONFIGS)):
        settings.append("bwd")
    *fused, unfused = _monta_layer_under(monkeypatch, "MONTA_FUSED_SWIGLU", (*settings, "0"))
    assert calls == settings, "the fused path ran other than once per fused setting"
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
    splits = calls[0].get()  # read once, inside fc1's GEMMs, and shared with fc2's
    assert calls[1] is calls[0] and sum(splits) == 2048 and len(splits) == 8  # 1024 tokens, top-2
    _assert_same_to_bf16(per_expert, grouped)


def test_per_expert_layer_waits_for_the_count_copy_only(nccl_world_of_one, monkeypatch):
    """Under one cuBLAS GEMM per expert, MoNTA's dispatcher starts the counts' copy to the host
    before it queues the permutation (monta/per_expert_gemm.py): the experts then wait on that
    copy's event, not on a stream sync, and the layer's forward + backward holds none."""
    from monta import per_expert_gemm

    monkeypatch.setenv("MONTA_GROUPED_GEMM", "cublas")
    splits = []
    real = per_expert_gemm.host_splits
    monkeypatch.setattr(per_expert_gemm, "host_splits",
                        lambda *args: splits.append(real(*args)) or splits[-1])
    layer = _moe_layer("monta", grouped=True, aux_loss=True)
    x = torch.randn(512, 2, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    syncs = _synchronizing_ops(lambda: layer(x)[0].backward(grad))
    assert splits and all(s is not None and sum(s.get()) == 2048 for s in splits), splits
    assert not syncs, "\n".join(syncs)


def _kernel_streams(fn) -> set:
    """The CUDA streams the GPU work ``fn`` launches ran on (torch.profiler's Kineto events:
    kernels, copies and memsets)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.device_resource_id() for e in prof.profiler.kineto_results.events()
            if e.device_type() == DeviceType.CUDA}


@pytest.mark.parametrize("path", [("MONTA_GROUPED_GEMM", "cublas"),
                                  ("MONTA_FUSED_SWIGLU", "fwd"), ("MONTA_FUSED_SWIGLU", "0")],
                         ids=["per_expert", "grouped_fused", "grouped_unfused"])
def test_weight_gradients_on_a_side_stream_change_nothing(nccl_world_of_one, monkeypatch, path):
    """MONTA_WGRAD_STREAM=1 (the default, monta/wgrad_overlap.py) runs the experts' weight
    gradients on a second stream in each expert path (one cuBLAS GEMM per expert; the grouped
    kernels with SwiGLU·prob fused into fc1 or not) and gives bit for bit the output and
    gradients of MONTA_WGRAD_STREAM=0, which keeps every kernel on one stream."""
    monkeypatch.setenv(*path)
    layer = _moe_layer("monta", grouped=True)
    x = torch.randn(512, 2, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    results, streams = [], []
    for value in ("1", "0"):
        monkeypatch.setenv("MONTA_WGRAD_STREAM", value)
        layer.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        out = layer(inp)[0]
        streams.append(_kernel_streams(lambda: out.backward(grad)))
        results.append((out, inp.grad, {k: p.grad for k, p in layer.named_parameters()}))
    assert len(streams[0]) == 2 and len(streams[1]) == 1, streams
    (out1, dx1, g1), (out0, dx0, g0) = results
    assert torch.equal(out1, out0) and torch.equal(dx1, dx0)
    assert g1.keys() == g0.keys() and all(g0[k] is not None for k in g0)
    for name in g1:
        assert torch.equal(g1[name], g0[name]), name
