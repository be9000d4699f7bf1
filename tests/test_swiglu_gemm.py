"""monta/swiglu_gemm.py on CPU: which passes are fused, and that nothing fuses where its Triton
kernels cannot run (the GPU tier, tests/gpu, checks the kernels against fp64)."""

import pytest
import torch

from monta import swiglu_gemm


def test_fused_passes_default_and_choices(monkeypatch):
    monkeypatch.delenv("MONTA_FUSED_SWIGLU", raising=False)
    assert swiglu_gemm.fused_passes() == "fwd"
    for choice in ("fwd", "all", "0"):
        monkeypatch.setenv("MONTA_FUSED_SWIGLU", choice)
        assert swiglu_gemm.fused_passes() == choice


@pytest.mark.parametrize("bad", ["1", "bwd", ""])
def test_fused_passes_rejects_unknown_values(monkeypatch, bad):
    monkeypatch.setenv("MONTA_FUSED_SWIGLU", bad)
    with pytest.raises(ValueError, match="MONTA_FUSED_SWIGLU must be one of fwd, all, 0"):
        swiglu_gemm.fused_passes()


def test_not_supported_on_cpu():
    x = torch.zeros(16, 64, dtype=torch.bfloat16)
    w1 = torch.zeros(2, 64, 32, dtype=torch.bfloat16)
    w2 = torch.zeros(2, 16, 64, dtype=torch.bfloat16)
    assert not swiglu_gemm.supported(x, w1, w2)
