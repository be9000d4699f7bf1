"""Grouped-GEMM experts (monta/experts.py) and SDPA attention (monta/attention.py) on CPU.

The MoE layer's numerics against the dense reference (EP, expert-TP, capacity, empty ranks) are
in tests/dispatch/test_moe_layer_reference.py; the bf16 CUDA kernel path is in tests/gpu. Here:
the grouped-GEMM offsets convention, equality with megatron's SequentialMLP on the same weights
(outputs and every gradient, with experts that get no tokens), checkpoints that move between
the two expert layouts, and SDPA attention against megatron's DotProductAttention.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from monta.experts import expert_offsets, grouped_mm, grouped_mm_supported
from monta.testing import run_distributed

COUNTS = [5, 0, 3, 0, 0, 9, 1, 0]  # empty experts first, in the middle and last


def _grouped_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(COUNTS), 16, generator=gen, dtype=dtype)
    w = torch.randn(len(COUNTS), 16, 24, generator=gen, dtype=dtype)
    return x, w


def test_offsets_are_int32_row_ends():
    offsets = expert_offsets(torch.tensor(COUNTS), torch.device("cpu"))
    assert offsets.dtype == torch.int32 and offsets.tolist() == [5, 5, 8, 8, 8, 17, 18, 18]


def test_loop_matches_per_expert_products_with_empty_experts():
    x, w = _grouped_inputs()
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = grouped_mm(x, w, torch.tensor(COUNTS))
    assert not grouped_mm_supported(x, w)  # CPU: the loop
    ends = torch.tensor(COUNTS).cumsum(0).tolist()
    starts = [0] + ends[:-1]
    expected = torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip(starts, ends))])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    for e, (a, b) in enumerate(zip(starts, ends)):
        torch.testing.assert_close(w.grad[e], x[a:b].detach().t() @ grad[a:b])
        if a == b:
            assert torch.count_nonzero(w.grad[e]) == 0, f"empty expert {e} got a gradient"


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_kernel_agrees_with_loop_on_our_offsets():
    """The CUDA path hands ``expert_offsets`` to ``torch._grouped_mm``; torch's CPU version of
    the op (its reference loop) checks that convention, forward and backward."""
    x, w = _grouped_inputs()
    try:
        grouped = torch._grouped_mm(x, w, offs=expert_offsets(torch.tensor(COUNTS), x.device))
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._grouped_mm does not run on CPU here: {error}")
    torch.testing.assert_close(grouped, grouped_mm(x, w, torch.tensor(COUNTS), force_loop=True))


# ----------------------------------------------------------------- one-rank gloo jobs

H, F_, E = 32, 48, 8


def _config(grouped: bool, dispatcher: str = "alltoall", topk: int = 2):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=H, ffn_hidden_size=F_, num_attention_heads=4,
        num_query_groups=2, num_moe_experts=E, moe_router_topk=topk,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=grouped, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
        normalization="RMSNorm", use_cpu_initialization=True, params_dtype=torch.float32)


def _moe_layer(grouped: bool, dispatcher: str = "alltoall", **config_overrides):
    import dataclasses

    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module

    from monta.model import gpt_moe_layer_spec

    config = dataclasses.replace(_config(grouped, dispatcher), **config_overrides)
    torch.manual_seed(0)
    return build_module(gpt_moe_layer_spec(config).submodules.mlp, config=config,
                        pg_collection=get_default_pg_collection())


def _tokens():
    """[S, B, H] tokens and an upstream gradient."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 2, H, generator=gen), torch.randn(16, 2, H, generator=gen)


def _run(layer, x, grad):
    from monta.testing.moe_sharding import _expert_tensors

    inp = x.clone().requires_grad_(True)
    out, _ = layer(inp)
    out.backward(grad)
    experts = _expert_tensors(layer, grads=True)
    return {"output": out.detach(), "input": inp.grad, "router": layer.router.weight.grad,
            **{f"expert{i}.{k}": v.clone() for i, d in experts.items() for k, v in d.items()}}


def _same_weights_cases(rank: int, world_size: int) -> list[str]:
    from megatron.core import parallel_state as ps

    from monta.compat import apply_cpu_patches
    from monta.experts import MoNTAGroupedMLP, copy_from_sequential

    apply_cpu_patches()
    ps.initialize_model_parallel()
    checked = []
    try:
        for dispatcher in ("alltoall", "monta"):
            for cold in (False, True):
                sequential, grouped = _moe_layer(False, dispatcher), _moe_layer(True, dispatcher)
                assert isinstance(grouped.experts, MoNTAGroupedMLP)
                grouped.router.weight.data.copy_(sequential.router.weight.data)
                copy_from_sequential(grouped.experts, sequential.experts)
                x, grad = _tokens()
                if cold:  # experts 4..7 get no tokens: their grads must be exactly zero
                    u = torch.ones(H) / H**0.5  # every token: component 3 along u
                    x = x - (x @ u).unsqueeze(-1) * u + 3.0 * u
                    for layer in (sequential, grouped):
                        layer.router.weight.data[:4] += 5.0 * u  # logits +15 ...
                        layer.router.weight.data[4:] -= 5.0 * u  # ... and -15
                want, got = _run(sequential, x, grad), _run(grouped, x, grad)
                for name in want:
                    torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6,
                                               msg=lambda m, n=name: f"{dispatcher} {n}: {m}")
                if cold:
                    for e in range(4, E):
                        assert torch.count_nonzero(got[f"expert{e}.linear_fc1"]) == 0
                        assert torch.count_nonzero(got[f"expert{e}.linear_fc2"]) == 0
                assert want["output"].abs().max() > 1e-3
                checked.append(f"{dispatcher}/{'cold' if cold else 'all'}")
    finally:
        ps.destroy_model_parallel()
    return checked


def test_grouped_experts_equal_sequential_mlp_on_same_weights():
    checked = run_distributed(_same_weights_cases, 1, timeout_s=180)[0]
    assert checked == ["alltoall/all", "alltoall/cold", "monta/all", "monta/cold"]


def _recompute_cases(rank: int, world_size: int) -> list[str]:
    """The grouped experts under ``--recompute-modules moe_act`` (the activation between the
    GEMMs checkpointed, its output discarded and rebuilt in the backward pass) and under
    ``moe`` (the whole layer rerun): outputs and every gradient as without recompute."""
    from megatron.core import parallel_state as ps

    from monta.compat import apply_cpu_patches

    apply_cpu_patches()
    ps.initialize_model_parallel()
    checked = []
    try:
        x, grad = _tokens()
        want = _run(_moe_layer(True, "monta"), x, grad)
        for modules in (["moe_act"], ["moe"]):
            layer = _moe_layer(True, "monta", recompute_granularity="selective",
                               recompute_modules=modules)
            assert layer.experts.activation_recompute == (modules == ["moe_act"])
            assert layer.moe_layer_recompute == (modules == ["moe"])
            got = _run(layer, x, grad)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=0, atol=0,
                                           msg=lambda m, n=name: f"{modules} {n}: {m}")
            checked.append(modules[0])
    finally:
        ps.destroy_model_parallel()
    return checked


def test_grouped_experts_recompute_as_without():
    assert run_distributed(_recompute_cases, 1, timeout_s=180)[0] == ["moe_act", "moe"]


def _fused_fallback_cases(rank: int, world_size: int) -> dict:
    """The layer as on a GPU where the fused SwiGLU GEMMs apply but fail (e.g. Triton cannot
    compile them): the fused call is stood in for by one that raises, the grouped GEMMs by the
    loop. Unasked (no MONTA_FUSED_SWIGLU) it warns once and runs unfused; asked, it raises."""
    import logging

    from megatron.core import parallel_state as ps

    from monta import experts, swiglu_gemm
    from monta.compat import apply_cpu_patches

    apply_cpu_patches()
    ps.initialize_model_parallel()
    calls, warnings = [], []

    def failing_ffn(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of resources: shared memory")

    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    experts.logger.addHandler(handler)
    patched = {(experts, "grouped_mm_supported"): lambda x, w: True,
               (experts, "grouped_mm"): lambda x, w, tpe, offsets=None: loop(x, w, tpe),
               (swiglu_gemm, "supported"): lambda x, w1, w2, passes, row_ends=None: True,
               (swiglu_gemm, "swiglu_expert_ffn"): failing_ffn}
    loop = lambda x, w, tpe: grouped_mm(x, w, tpe, force_loop=True)  # noqa: E731
    saved = {key: getattr(*key) for key in patched}
    try:
        x, grad = _tokens()
        want = _run(_moe_layer(True, "monta"), x, grad)
        for (module, name), value in patched.items():
            setattr(module, name, value)
        os.environ.pop("MONTA_FUSED_SWIGLU", None)
        got = [_run(_moe_layer(True, "monta"), x, grad) for _ in range(2)]
        result = {"calls": len(calls), "warnings": list(warnings),
                  "equal": all(torch.equal(g[k], want[k]) for g in got for k in want)}
        experts._failed.discard("fused")
        os.environ["MONTA_FUSED_SWIGLU"] = "fwd"
        try:
            _run(_moe_layer(True, "monta"), x, grad)
            result["asked"] = "ran"
        except RuntimeError as error:
            result["asked"] = str(error)
        return result
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
        experts.logger.removeHandler(handler)
        ps.destroy_model_parallel()


def test_fused_swiglu_failure_falls_back_unless_asked_for():
    result = run_distributed(_fused_fallback_cases, 1, timeout_s=180)[0]
    assert result["calls"] == 1, "a fused path that failed once was tried again"
    assert result["equal"], "the fallback did not compute what the unfused layer does"
    assert len(result["warnings"]) == 1 and "fused" in result["warnings"][0]
    assert "out of resources" in result["warnings"][0]
    assert result["asked"] == "out of resources: shared memory"


def _sharded_keys_cases(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state as ps

    from monta.compat import apply_cpu_patches
    from monta.convert.job import local_sharded_tensors

    apply_cpu_patches()
    ps.initialize_model_parallel()
    try:
        # SequentialMLP saves one chunk per expert, GroupedMLP one for all; keys and global
        # shapes are what a torch_dist checkpoint records, and they agree
        return {grouped: {(sh.key, tuple(sh.global_shape))
                          for sh in local_sharded_tensors(_moe_layer(grouped))}
                for grouped in (False, True)}
    finally:
        ps.destroy_model_parallel()


def test_grouped_and_sequential_experts_checkpoint_the_same_tensors():
    """So checkpoints move between the two (trained both ways in
    tests/training/test_pretrain_e2e.py::test_grouped_gemm_checkpoint_resumes_sequential)."""
    keys = run_distributed(_sharded_keys_cases, 1, timeout_s=120)[0]
    assert keys[True] == keys[False]
    assert ("experts.experts.linear_fc1.weight", (E, 2 * F_, H)) in keys[True]
    assert ("experts.experts.linear_fc2.weight", (E, H, F_)) in keys[True]


def _attention_cases(rank: int, world_size: int) -> int:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from monta.attention import SDPAttention, sdpa_applies
    from monta.compat import apply_cpu_patches

    apply_cpu_patches()
    ps.initialize_model_parallel()
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)  # megatron's attention forks the model-parallel RNG
    try:
        config = _config(False)
        config.kv_channels = H // 4
        config.attention_dropout = 0.0  # dropout draws differ between the two implementations
        assert sdpa_applies(config, on_gpu=True) and not sdpa_applies(config, on_gpu=False)
        kw = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                  attention_type="self")
        ours, theirs = SDPAttention(**kw), DotProductAttention(**kw)
        gen = torch.Generator().manual_seed(2)
        s, b, d = 12, 3, H // 4
        q = torch.randn(s, b, 4, d, generator=gen, requires_grad=True)
        k = torch.randn(s, b, 2, d, generator=gen, requires_grad=True)  # GQA: 2 groups
        v = torch.randn(s, b, 2, d, generator=gen, requires_grad=True)
        grad = torch.randn(s, b, 4 * d, generator=gen)
        results = []
        for module in (ours, theirs):
            for t in (q, k, v):
                t.grad = None
            out = module(q, k, v, None)
            out.backward(grad)
            results.append([out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return len(results[0])
    finally:
        ps.destroy_model_parallel()


def test_sdpa_attention_matches_megatron_dot_product_attention():
    assert run_distributed(_attention_cases, 1, timeout_s=120)[0] == 4


_SWIGLU_CHECK = """
import torch, torch.nn.functional as F
from monta.swiglu import weighted_swiglu
worst = 0.0
for dtype, n, f in [(torch.float32, 37, 1500), (torch.float32, 5, 96), (torch.bfloat16, 9, 1100),
                    (torch.float32, 0, 64)]:
    gen = torch.Generator().manual_seed(0)
    h, p = torch.randn(n, 2 * f, generator=gen).to(dtype), torch.rand(n, 1, generator=gen)
    dy = torch.randn(n, f, generator=gen).to(dtype)
    h1, p1 = h.clone().requires_grad_(), p.clone().requires_grad_()
    y1 = weighted_swiglu(h1, p1)
    y1.backward(dy)
    h2, p2 = h.double().requires_grad_(), p.double().requires_grad_()
    g, u = torch.chunk(h2, 2, dim=-1)
    y2 = F.silu(g) * u * p2
    y2.backward(dy.double())
    assert y1.dtype == h1.grad.dtype == dtype and p1.grad.shape == p.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in ((y1, y2), (h1.grad, h2.grad), (p1.grad, p2.grad)):
        err = ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()
        assert err < tol, (dtype, n, f, err)
        worst = max(worst, err if dtype == torch.float32 else 0.0)
print("ok", worst)
"""


def test_swiglu_kernels_match_eager_under_triton_interpreter():
    """monta/swiglu.py's kernels, run by Triton's CPU interpreter (the GPU tier runs them
    compiled): fp32 to 1e-6, bf16 to rounding, a width not a multiple of the block, no rows."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", _SWIGLU_CHECK], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr[-3000:]
