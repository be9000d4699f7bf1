"""bench/gpu_expert_kernels.py on CPU: its settings name what MoNTA accepts, and it refuses to
run without a GPU (it times GPU kernels; tests/gpu and the device runs cover the rest)."""

import pytest

from bench import gpu_expert_kernels as bench
from monta import expert_gemm, sm90_gemm, swiglu_gemm


def test_settings_name_real_kernels_and_fusions():
    for env in bench.SETTINGS.values():
        assert set(env) <= {"MONTA_GROUPED_GEMM", "MONTA_FUSED_SWIGLU"}
        assert env.get("MONTA_FUSED_SWIGLU", "auto") in swiglu_gemm.FUSE_CHOICES
        pin = env.get("MONTA_GROUPED_GEMM", "default")
        configs = pin.removeprefix(expert_gemm.SM90).split(",") if pin.startswith("sm90:") else []
        assert all(c in sm90_gemm.CONFIGS for c in configs)
    # the ping-pong setting is the small-expert default, the previous one the large-expert one
    assert bench.PING_PONG == "sm90:" + ",".join(expert_gemm.SM90_SMALL_EXPERT_CONFIGS)
    assert bench.PREVIOUS["MONTA_GROUPED_GEMM"] == "sm90:" + ",".join(
        expert_gemm.SM90_LARGE_EXPERT_CONFIGS)


def test_refuses_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--out", "/dev/null"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("tokens", ["2048,x", "0", "4096,-8"])
def test_refuses_token_counts_that_are_not_positive_integers(capsys, tokens):
    with pytest.raises(SystemExit):
        bench.main(["--out", "/dev/null", "--tokens", tokens])
    assert "--tokens" in capsys.readouterr().err
