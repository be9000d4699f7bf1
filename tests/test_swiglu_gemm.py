"""monta/swiglu_gemm.py on CPU: which passes are fused, and that nothing fuses where its Triton
kernels cannot run (the GPU tier, tests/gpu, checks the kernels against fp64)."""

import pytest
import torch

from monta import swiglu_gemm


def test_fused_passes_default_and_choices(monkeypatch):
    """Unset (``auto``): fc1's forward fused unless the row GEMMs run on the small-expert sm90
    kernels, whose unfused FFN is the faster one; a value the user sets is taken as it is
    (``bwd``, the sm90 fused input gradient, only when asked: it was no faster back to back)."""
    from monta import expert_gemm

    monkeypatch.delenv("MONTA_FUSED_SWIGLU", raising=False)
    x, ends = torch.empty(4, 8, dtype=torch.bfloat16), torch.tensor([2, 4], dtype=torch.int32)
    assert swiglu_gemm.fused_passes() == swiglu_gemm.fused_passes(x, ends) == "fwd"  # CPU
    small, large = expert_gemm.SM90_SMALL_EXPERT_CONFIGS[0], \
        expert_gemm.SM90_LARGE_EXPERT_CONFIGS[0]
    monkeypatch.setattr(expert_gemm, "row_config", lambda t, e: large)
    assert swiglu_gemm.fused_passes(x, ends) == "fwd"
    monkeypatch.setattr(expert_gemm, "row_config", lambda t, e: small)
    assert swiglu_gemm.fused_passes(x, ends) == "0"
    monkeypatch.setenv("MONTA_FUSED_SWIGLU", "auto")
    assert swiglu_gemm.fused_passes(x, ends) == "0"
    for choice in ("fwd", "all", "bwd", "0"):
        monkeypatch.setenv("MONTA_FUSED_SWIGLU", choice)
        assert swiglu_gemm.fused_passes(x, ends) == choice


def test_the_sm90_fused_input_gradient_takes_the_instance_whose_tiles_fit(monkeypatch):
    """``bwd`` runs fc2's input gradient on the SwiGLU instance whose column tiles cover F
    exactly (1408 = 8 tiles of 176; 128-wide tiles in 1x2 clusters compute 12 for 11), of those
    built; none built: not supported."""
    from monta import sm90_gemm

    narrow, wide = sm90_gemm.SWIGLU_DGRAD_CONFIGS
    built = {narrow, wide}
    monkeypatch.setattr(sm90_gemm, "swiglu_dgrad_built", lambda config: config in built)
    assert swiglu_gemm.sm90_dgrad_config(1408) == wide
    assert swiglu_gemm.sm90_dgrad_config(2048) == narrow
    assert swiglu_gemm.sm90_dgrad_config(1000) == narrow
    built.discard(wide)
    assert swiglu_gemm.sm90_dgrad_config(1408) == narrow
    built.clear()
    assert swiglu_gemm.sm90_dgrad_config(1408) is None


@pytest.mark.parametrize("bad", ["1", "both", ""])
def test_fused_passes_rejects_unknown_values(monkeypatch, bad):
    monkeypatch.setenv("MONTA_FUSED_SWIGLU", bad)
    with pytest.raises(ValueError,
                       match="MONTA_FUSED_SWIGLU must be one of auto, fwd, all, bwd, 0"):
        swiglu_gemm.fused_passes()


def test_swiglu_expert_ffn_refuses_unknown_passes():
    with pytest.raises(ValueError, match="passes must be fwd, all or bwd"):
        swiglu_gemm.swiglu_expert_ffn(None, None, None, None, None, passes="0")


def test_not_supported_on_cpu():
    x = torch.zeros(16, 64, dtype=torch.bfloat16)
    w1 = torch.zeros(2, 64, 32, dtype=torch.bfloat16)
    w2 = torch.zeros(2, 16, 64, dtype=torch.bfloat16)
    for passes in ("fwd", "all", "bwd"):
        assert not swiglu_gemm.supported(x, w1, w2, passes)
