"""monta/rope.py on a GPU: the fused RoPE against fp64 megatron RoPE (outputs and gradients),
and megatron's attention routed to it only for configs that ask.

    python -m pytest tests/gpu -m gpu -v        # on a machine with a GPU
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _angles(s: int, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    """megatron's RotaryEmbedding layout: [s, 1, 1, R], the R/2 angles twice, fp32."""
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2, device="cuda").float() / rot_dim)
    angles = torch.outer(torch.arange(s, device="cuda").float(), inv)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def _query_like(s, b, heads, dim, dtype, gen):
    """A view of a fused QKV output, as megatron's attention hands query to RoPE: strided."""
    qkv = torch.randn(s, b, 3 * heads * dim, device="cuda", generator=gen).to(dtype)
    return qkv.view(s, b, 3 * heads, dim)[:, :, :heads]


@pytest.mark.parametrize("s,b,heads,dim,rot_dim,dtype", [
    (256, 4, 8, 128, 128, torch.bfloat16),  # the training run's head dim, a strided view
    (37, 3, 5, 96, 64, torch.float32),  # partial rotary: the last 32 columns pass through
    (5, 1, 3, 80, 80, torch.float16),
])
def test_fused_rope_matches_fp64(s, b, heads, dim, rot_dim, dtype):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from monta.rope import fused_rope, fused_rope_applies

    gen = torch.Generator(device="cuda").manual_seed(s)
    t = _query_like(s, b, heads, dim, dtype, gen)
    freqs = _angles(s, rot_dim)
    grad = torch.randn(s, b, heads, dim, device="cuda", generator=gen).to(dtype)
    assert fused_rope_applies(t, freqs) and not t.is_contiguous()
    got_t = t.detach().requires_grad_(True)
    got = fused_rope(got_t, freqs)
    got.backward(grad)
    want_t = t.detach().double().requires_grad_(True)
    want = _apply_rotary_pos_emb_bshd(want_t, freqs.double())
    want.backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, w in ((got, want), (got_t.grad, want_t.grad)):
        assert a.dtype == dtype and a.shape == w.shape
        assert ((a.double() - w).norm() / w.norm()).item() < tol
    assert torch.equal(got[..., rot_dim:], t[..., rot_dim:])  # the pass-through part, exact


def test_attention_routes_to_fused_rope_only_when_asked(monkeypatch):
    from megatron.core.transformer import attention

    from monta import rope

    rope.install()
    rope.install()  # idempotent: still one layer of routing
    calls = []
    monkeypatch.setattr(rope, "fused_rope",
                        lambda t, f: calls.append(1) or rope.FusedRoPE.apply(t, f))
    gen = torch.Generator(device="cuda").manual_seed(0)
    t, freqs = _query_like(64, 2, 4, 128, torch.bfloat16, gen), _angles(64, 128)
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False,
                             multi_latent_attention=False, monta_rope_fusion=True)
    fused = attention.apply_rotary_pos_emb(t, freqs, config=config, cp_group=object())
    assert calls == [1]
    config.monta_rope_fusion = False
    stock = attention.apply_rotary_pos_emb(t, freqs, config=config, cp_group=object())
    config.monta_rope_fusion, config.rotary_interleaved = True, True  # not covered: stock
    attention.apply_rotary_pos_emb(t, freqs, config=config, cp_group=object())
    assert calls == [1]
    assert ((fused.float() - stock.float()).norm() / stock.float().norm()).item() < 1e-2
