"""monta/swiglu_gemm.py on CPU: which passes are fused, and that nothing fuses where its Triton
kernels cannot run (the GPU tier, tests/gpu, checks the kernels against fp64)."""

import pytest
import torch

from monta import swiglu_gemm


def test_fused_passes_default_and_choices(monkeypatch):
    """Unset (``auto``): fc1's forward fused, except where the row GEMMs run on the small-expert
    sm90 kernels and the library's fused fc1 cannot run (not built, or F off its paired runs):
    there the unfused FFN beats Triton's fused fc1. A value the user sets is taken as it is
    (``bwd``, the sm90 fused input gradient, only when asked: it was no faster back to back)."""
    from monta import expert_gemm, sm90_gemm

    monkeypatch.delenv("MONTA_FUSED_SWIGLU", raising=False)
    x, ends = torch.empty(4, 8, dtype=torch.bfloat16), torch.tensor([2, 4], dtype=torch.int32)
    assert swiglu_gemm.fused_passes() == swiglu_gemm.fused_passes(x, ends) == "fwd"  # CPU
    small, large = expert_gemm.SM90_SMALL_EXPERT_CONFIGS[0], \
        expert_gemm.SM90_LARGE_EXPERT_CONFIGS[0]
    monkeypatch.setattr(expert_gemm, "row_config", lambda t, e: large)
    assert swiglu_gemm.fused_passes(x, ends) == "fwd"
    built = set()
    monkeypatch.setattr(sm90_gemm, "swiglu_fc1_built", lambda c: c in built)
    monkeypatch.setattr(expert_gemm, "row_config", lambda t, e: small)
    assert swiglu_gemm.fused_passes(x, ends) == "0"
    built.add(small)
    assert swiglu_gemm.fused_passes(x, ends) == "fwd"
    monkeypatch.setattr(swiglu_gemm, "sm90_fc1_config", lambda x, w1, e: None)  # F off the runs
    assert swiglu_gemm.fused_passes(x, ends, torch.empty(2, 8, 24)) == "0"
    built.clear()
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


def test_fwd_runs_on_the_sm90_fused_fc1_of_the_row_config_where_f_fits(monkeypatch):
    """``fwd`` takes the sm90 library's fc1 with the activation in its epilogue when the row
    GEMMs' config has one built and F is a multiple of its paired runs (half the tile's 128
    columns); otherwise (another row config, an F off the runs, no row ends) Triton's."""
    from monta import expert_gemm, sm90_gemm

    config = sm90_gemm.SWIGLU_FC1_CONFIGS[0]
    built = {config}
    monkeypatch.setattr(sm90_gemm, "available", lambda t: True)
    monkeypatch.setattr(sm90_gemm, "swiglu_fc1_built", lambda c: c in built)
    monkeypatch.setattr(expert_gemm, "row_config", lambda t, e: config)
    x, ends = torch.empty(4, 64, dtype=torch.bfloat16), torch.tensor([2, 4], dtype=torch.int32)

    def w1(ffn):
        return torch.empty(2, 64, 2 * ffn, dtype=torch.bfloat16)

    assert sm90_gemm.paired_width(config) == 64
    assert swiglu_gemm.sm90_fc1_config(x, w1(1408), ends) == config
    monkeypatch.setenv(swiglu_gemm.SM90_FC1_VARIABLE, "0")  # Triton's, to compare
    assert swiglu_gemm.sm90_fc1_config(x, w1(1408), ends) is None
    monkeypatch.delenv(swiglu_gemm.SM90_FC1_VARIABLE)
    assert swiglu_gemm.sm90_fc1_config(x, w1(1400), ends) is None
    assert swiglu_gemm.sm90_fc1_config(x, w1(1408), None) is None
    assert swiglu_gemm.sm90_fc1_config(x, w1(1408).transpose(1, 2).contiguous().transpose(1, 2),
                                       ends) is None
    built.clear()
    assert swiglu_gemm.sm90_fc1_config(x, w1(1408), ends) is None
    built.add(config)
    monkeypatch.setattr(expert_gemm, "row_config", lambda t, e: "128x256_c1x2")
    assert swiglu_gemm.sm90_fc1_config(x, w1(1408), ends) is None


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
