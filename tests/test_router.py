"""monta/router.py: the aux losses computed after the experts, and the routing straight into
the expert order, change no number.

One gloo rank, fp32 on CPU: the MoNTA layer with the deferred loss against the same layer
computing it inside ``routing()`` as megatron does (same weights, same tokens): output, every
gradient and the logged loss are bitwise equal, and the loss does reach the router's gradient.
Likewise the one-rank layer whose router returns the expert order against megatron's dense
routing map, to fp32 rounding: the softmax backward is ours there, and a token's k expert
outputs are summed in ascending expert order rather than top-k's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from monta.testing import run_distributed

H, F_, E = 32, 48, 8


def _layer(dispatcher: str, topk: int, coeff: float, seq_aux: bool, chunks: int = 1, **extra):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from monta.dispatch.monta_dispatcher import DispatchOptions
    from monta.model import gpt_moe_layer_spec

    config = TransformerConfig(
        num_layers=1, hidden_size=H, ffn_hidden_size=F_, num_attention_heads=4,
        num_moe_experts=E, moe_router_topk=topk,
        moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"] if seq_aux else "aux_loss",
        moe_aux_loss_coeff=[coeff, coeff] if seq_aux else coeff, moe_z_loss_coeff=1e-3,
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=True, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
        normalization="RMSNorm", use_cpu_initialization=True, params_dtype=torch.float32,
        **extra)
    config.monta_dispatch = DispatchOptions(chunks=chunks)  # chunks > 1: the pipelined forward
    torch.manual_seed(0)
    layer = build_module(gpt_moe_layer_spec(config, use_te=False).submodules.mlp, config=config,
                         pg_collection=get_default_pg_collection())
    layer.set_layer_number(1)  # so the loss is logged
    return layer


def _run(layer, x, grad):
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    clear_aux_losses_tracker()
    layer.zero_grad(set_to_none=True)
    inp = x.clone().requires_grad_(True)
    out, _ = layer(inp)
    out.backward(grad)
    logged = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
    return {"output": out.detach(), "input": inp.grad, "logged": logged,
            **{n: p.grad.clone() for n, p in layer.named_parameters()}}


def _tokens(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 2, H, generator=gen), torch.randn(16, 2, H, generator=gen)


def _assert_same(got: dict, want: dict, same) -> None:
    """Two :func:`_run` results: the logged losses bitwise (and non-zero), the tensors by
    ``same``."""
    for name, expected in want.items():
        if name == "logged":
            assert got[name].keys() == expected.keys() and expected, got[name].keys()
            for k in expected:
                assert torch.equal(got[name][k], expected[k]) and expected[k].abs().sum() > 0, k
        else:
            assert same(got[name], expected), name


def _deferral_cases(rank: int, world_size: int) -> list[str]:
    from megatron.core import parallel_state as ps

    from monta.compat import apply_cpu_patches
    from monta.dispatch.registry import MoNTAMoELayer

    apply_cpu_patches()
    ps.initialize_model_parallel()
    checked = []
    x, grad = _tokens(seed=1)
    try:
        for dispatcher, topk, seq_aux, chunks in (("monta", 2, False, 1), ("alltoall", 2, True, 1),
                                                  ("monta", 4, True, 1), ("monta", 2, True, 2)):
            layer = _layer(dispatcher, topk, 1e-2, seq_aux, chunks)
            assert layer._defers_aux_loss(None)
            deferred = _run(layer, x, grad)
            defers = MoNTAMoELayer._defers_aux_loss
            MoNTAMoELayer._defers_aux_loss = lambda self, _: False  # megatron's own order
            try:
                inline = _run(layer, x, grad)
            finally:
                MoNTAMoELayer._defers_aux_loss = defers
            _assert_same(deferred, inline, torch.equal)
            no_loss = _run(_layer(dispatcher, topk, 0.0, seq_aux, chunks), x, grad)
            assert not torch.equal(no_loss["router.weight"], deferred["router.weight"])
            assert torch.equal(no_loss["output"], deferred["output"])
            checked.append(f"{dispatcher}/top{topk}/c{chunks}")
    finally:
        ps.destroy_model_parallel()
    return checked


def test_deferred_aux_loss_changes_no_number():
    checked = run_distributed(_deferral_cases, 1, timeout_s=180)[0]
    assert checked == ["monta/top2/c1", "alltoall/top2/c1", "monta/top4/c1", "monta/top2/c2"]


def _expert_order_cases(rank: int, world_size: int) -> list[str]:
    from megatron.core import parallel_state as ps

    from monta.compat import apply_cpu_patches
    from monta.dispatch.plan import ExpertOrder
    from monta.dispatch.registry import MoNTAMoELayer

    apply_cpu_patches()
    ps.initialize_model_parallel()
    checked = []
    x, grad = _tokens(seed=2)
    try:
        for topk, seq_aux, deferred in ((2, False, True), (4, True, True), (2, True, False)):
            layer = _layer("monta", topk, 1e-2, seq_aux)
            assert layer.router.routes_in_expert_order()
            defers = MoNTAMoELayer._defers_aux_loss
            if not deferred:  # the loss attached to the ordered probabilities instead
                MoNTAMoELayer._defers_aux_loss = lambda self, _: False
            try:
                ordered = _run(layer, x, grad)
                assert isinstance(layer.token_dispatcher.rows_mask, ExpertOrder)
                layer.router.emit_expert_order = False  # megatron's dense probabilities and map
                dense = _run(layer, x, grad)
                assert layer.token_dispatcher.rows_mask.dtype == torch.bool
            finally:
                MoNTAMoELayer._defers_aux_loss = defers
            _assert_same(ordered, dense, functools.partial(torch.allclose, rtol=1e-6, atol=1e-7))
            checked.append(f"top{topk}/{'deferred' if deferred else 'inline'}")
        # routing it does not compute, or a dispatcher that needs the map: megatron's routing
        for dispatcher, extra in (("monta", dict(moe_router_pre_softmax=True)),
                                  ("monta", dict(moe_router_topk_scaling_factor=2.0)),
                                  ("monta", dict(moe_expert_capacity_factor=1.0)),
                                  ("alltoall", {})):
            layer = _layer(dispatcher, 2, 1e-2, False, **extra)
            assert not layer.router.routes_in_expert_order(), extra
            _run(layer, x, grad)
            assert not isinstance(getattr(layer.token_dispatcher, "rows_mask", None), ExpertOrder)
        assert not _layer("monta", 2, 1e-2, False, chunks=2).router.routes_in_expert_order()
        checked.append("fallbacks")
    finally:
        ps.destroy_model_parallel()
    return checked


def test_routing_in_expert_order_changes_no_number():
    checked = run_distributed(_expert_order_cases, 1, timeout_s=180)[0]
    assert checked == ["top2/deferred", "top4/deferred", "top2/inline", "fallbacks"]
