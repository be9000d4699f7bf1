"""bench/gpu_expert_kernels.py on CPU: its settings name what MoNTA accepts, and it refuses to
run without a GPU (it times GPU kernels; tests/gpu and the device runs cover the rest)."""

import pytest

from bench import gpu_expert_kernels as bench
from monta import expert_gemm, sm90_gemm, swiglu_gemm
from monta.testing import run_distributed


def test_settings_name_real_kernels_and_fusions():
    for env in bench.SETTINGS.values():
        assert set(env) <= {"MONTA_GROUPED_GEMM", "MONTA_FUSED_SWIGLU",
                            swiglu_gemm.SM90_FC1_VARIABLE}
        assert env.get("MONTA_FUSED_SWIGLU", "auto") in swiglu_gemm.FUSE_CHOICES
        assert env.get(swiglu_gemm.SM90_FC1_VARIABLE, "1") in ("0", "1")
        pin = env.get("MONTA_GROUPED_GEMM", "default")
        slots = pin.removeprefix(expert_gemm.SM90).split(",") if pin.startswith("sm90:") else []
        assert all(c in sm90_gemm.CONFIGS for slot in slots
                   for c in slot.split(expert_gemm.ALTERNATIVES))
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


@pytest.mark.parametrize("spec", ["128", "x:sm90:128x128_pp_c1x2", "0:torch", "64:"])
def test_refuses_malformed_padded_settings(capsys, spec):
    with pytest.raises(SystemExit):
        bench.main(["--out", "/dev/null", "--padded", spec])
    assert "--padded" in capsys.readouterr().err


def test_refuses_an_unknown_fusion_for_the_pins(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--out", "/dev/null", "--pin", "torch", "--pin-fused-swiglu", "yes"])
    assert "--pin-fused-swiglu: invalid choice" in capsys.readouterr().err


def _padded_ffn_errors(rank: int, world_size: int) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    from bench.gpu_timing import Timer
    from monta.compat import apply_cpu_patches

    apply_cpu_patches()
    ps.initialize_model_parallel()
    try:
        bench.ROUNDS = 1
        device = torch.device("cpu")
        shape = dict(hidden=64, ffn=32, experts=4, topk=2)
        settings = {"unpadded": {}, "padded8": {"MONTA_EXPERT_ROW_ALIGNMENT": "8"}}
        result = bench.bench_ffn(shape, 64, settings, device, Timer(device))
        return {"rows": result["rows"], "errors": result["rel_err_vs_first"],
                "timed": sorted(k for k in result["back_to_back"] if k != "errors")}
    finally:
        ps.destroy_model_parallel()


def test_padded_setting_matches_unpadded_on_real_rows():
    """A setting with MONTA_EXPERT_ROW_ALIGNMENT runs the experts on rows padded as the
    dispatcher pads them; its output and gradients, read back at the real rows, are the
    unpadded setting's (CPU: the experts' per-expert loop)."""
    result = run_distributed(_padded_ffn_errors, 1, timeout_s=180)[0]
    assert result["rows"] == 128
    assert max(result["errors"]["padded8"]) < 1e-2
    assert result["timed"] == ["dense", "padded8", "unpadded"]
