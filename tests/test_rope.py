"""monta/rope.py where it does not apply (CPU): megatron's own RoPE runs, unchanged; and the
flags that turn it on. The kernel itself is checked on a GPU (tests/gpu/test_gpu_rope.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from monta import rope
from monta.training.arguments import parse_args
from monta.training.config import transformer_config_from_args

from tests.conftest import TINY_MODEL


def test_cpu_calls_keep_megatrons_rope():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.transformer import attention

    rope.install()
    t = torch.randn(8, 2, 3, 16)
    freqs = torch.randn(8, 1, 1, 16)
    assert not rope.fused_rope_applies(t, freqs)
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False,
                             multi_latent_attention=False, monta_rope_fusion=True)
    got = attention.apply_rotary_pos_emb(t, freqs, config=config, cp_group=object())
    assert torch.equal(got, _apply_rotary_pos_emb_bshd(t, freqs))


def test_a_failing_kernel_falls_back_to_megatrons_rope_once(monkeypatch, caplog):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.transformer import attention

    rope.install()
    calls = []

    def broken(t, freqs):
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(rope, "fused_rope_applies", lambda t, freqs: True)
    monkeypatch.setattr(rope, "fused_rope", broken)
    monkeypatch.setattr(rope, "_failed", [])
    t, freqs = torch.randn(6, 2, 3, 8), torch.randn(6, 1, 1, 8)
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False,
                             multi_latent_attention=False, monta_rope_fusion=True)
    for _ in range(2):
        got = attention.apply_rotary_pos_emb(t, freqs, config=config, cp_group=object())
        assert torch.equal(got, _apply_rotary_pos_emb_bshd(t, freqs))
    assert calls == [1]  # tried once, then megatron's
    assert "fused RoPE unavailable (RuntimeError: no kernel for this GPU)" in caplog.text


def test_flags_set_the_configs_rope_fusion():
    def config(*extra):
        return transformer_config_from_args(parse_args([*TINY_MODEL, "--mock-data", *extra]))

    assert config().monta_rope_fusion
    assert not config("--no-rope-fusion").monta_rope_fusion
    assert not config("--position-embedding-type", "learned_absolute").monta_rope_fusion
    fused_ce = config("--cross-entropy-loss-fusion")
    assert fused_ce.cross_entropy_loss_fusion and fused_ce.cross_entropy_fusion_impl == "native"
    assert not config().cross_entropy_loss_fusion
