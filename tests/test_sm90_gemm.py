"""monta/sm90_gemm.py off the GPU: an absent library is reported, not crashed on (the kernels
themselves are checked on an H200 in tests/gpu; the build in tests/tools/)."""

from __future__ import annotations

import pytest
import torch

from monta import sm90_gemm


@pytest.fixture
def no_library(monkeypatch, tmp_path):
    monkeypatch.setenv("MONTA_SM90_GEMM_LIBRARY", str(tmp_path / "absent.so"))
    monkeypatch.setattr(sm90_gemm, "_library", None)
    monkeypatch.setattr(sm90_gemm, "_built", ())
    monkeypatch.setattr(sm90_gemm, "_aligned_built", {})
    monkeypatch.setattr(sm90_gemm, "_fused_built", {})


def test_without_the_library_nothing_is_available(no_library):
    assert sm90_gemm.built_configs() == () == sm90_gemm.built_configs(aligned=True)
    assert not sm90_gemm.available(torch.empty(1, dtype=torch.bfloat16))
    assert not any(map(sm90_gemm.swiglu_dgrad_built, sm90_gemm.SWIGLU_DGRAD_CONFIGS))


def _swiglu_dgrad_inputs(rows=4, ffn=8, hidden=16, h_width=None):
    bf16 = torch.bfloat16
    return (torch.empty(rows, hidden, dtype=bf16), torch.empty(2, ffn, hidden, dtype=bf16),
            torch.empty(rows, h_width or 2 * ffn, dtype=bf16), torch.empty(rows, 1),
            torch.tensor([2, rows], dtype=torch.int32))


def test_the_swiglu_input_gradient_says_when_it_is_not_built(no_library):
    config = sm90_gemm.SWIGLU_DGRAD_CONFIGS[0]
    with pytest.raises(ValueError, match="no SwiGLU input-gradient instance of '128x128_pp_c1x2'"
                                         r" \(built: none\)"):
        sm90_gemm.swiglu_dgrad(*_swiglu_dgrad_inputs(), config)


def test_the_swiglu_input_gradient_refuses_bad_shapes_before_any_launch(no_library, monkeypatch):
    """With the instance present (stood in for: nothing may be called), misfit operands are
    refused in Python, before a kernel could read past them."""
    config = sm90_gemm.SWIGLU_DGRAD_CONFIGS[0]
    monkeypatch.setattr(sm90_gemm, "_load", lambda: object())
    monkeypatch.setattr(sm90_gemm, "_fused_built", {sm90_gemm.SWIGLU_DGRAD_KIND: (config,)})
    with pytest.raises(ValueError, match="divisible by 8"):
        sm90_gemm.swiglu_dgrad(*_swiglu_dgrad_inputs(ffn=12), config)
    with pytest.raises(ValueError, match=r"h must be \[4, 16\] and dout \[4, 16\]"):
        sm90_gemm.swiglu_dgrad(*_swiglu_dgrad_inputs(h_width=24), config)


def _swiglu_fc1_inputs(rows=4, ffn=64, hidden=16):
    bf16 = torch.bfloat16
    return (torch.empty(rows, hidden, dtype=bf16), torch.empty(2, hidden, 2 * ffn, dtype=bf16),
            torch.empty(rows, 1), torch.tensor([2, rows], dtype=torch.int32))


def test_the_fused_fc1_says_when_it_is_not_built_and_refuses_bad_shapes(no_library, monkeypatch):
    """Absent: a message naming what is built. Present (stood in for: nothing may be called):
    an F that its paired runs do not divide, or x of another width, is refused in Python."""
    config = sm90_gemm.SWIGLU_FC1_CONFIGS[0]
    with pytest.raises(ValueError, match="no fc1-with-SwiGLU instance of '128x128_pp_c1x2'"
                                         r" \(built: none\)"):
        sm90_gemm.swiglu_fc1(*_swiglu_fc1_inputs(), config)
    monkeypatch.setattr(sm90_gemm, "_load", lambda: object())
    monkeypatch.setattr(sm90_gemm, "_fused_built", {sm90_gemm.SWIGLU_FC1_KIND: (config,)})
    with pytest.raises(ValueError, match="needs F a multiple of 64"):
        sm90_gemm.swiglu_fc1(*_swiglu_fc1_inputs(ffn=96), config)
    x, w1, probs, ends = _swiglu_fc1_inputs()
    with pytest.raises(ValueError, match=r"x must be \[n, 16\]"):
        sm90_gemm.swiglu_fc1(x[:, :8], w1, probs, ends, config)


def test_the_fused_kinds_pass_their_c_arguments_in_order(no_library, monkeypatch):
    """With the instances stood in, each fused wrapper hands the C function its tensors'
    pointers in the header's order, then int32 row ends, groups, F and H; the probabilities
    as packed fp32 rows; a failing status becomes an error naming the instance."""
    calls, made = [], []

    def run(library, name, groups, device, *args):
        calls.append((name, groups, args))
        return 0

    def recorded(convert):
        return lambda *a: made.append(convert(*a)) or made[-1]

    monkeypatch.setattr(sm90_gemm, "_int32", recorded(sm90_gemm._int32))
    monkeypatch.setattr(sm90_gemm, "_row_probs", recorded(sm90_gemm._row_probs))
    monkeypatch.setattr(sm90_gemm, "_load", lambda: object())
    monkeypatch.setattr(sm90_gemm, "_run_with_workspace", run)
    monkeypatch.setattr(sm90_gemm, "_fused_built", {
        sm90_gemm.SWIGLU_FC1_KIND: sm90_gemm.SWIGLU_FC1_CONFIGS,
        sm90_gemm.SWIGLU_DGRAD_KIND: sm90_gemm.SWIGLU_DGRAD_CONFIGS})
    x, w1, probs, ends = _swiglu_fc1_inputs()
    ends64 = ends.to(torch.int64)
    h, y = sm90_gemm.swiglu_fc1(x, w1, probs.double(), ends64, "128x128_pp_c1x2")
    name, groups, args = calls.pop()
    assert name == "monta_gg_128x128_pp_c1x2_swiglu_fc1" and groups == 2
    assert args[:4] == (x.data_ptr(), w1.data_ptr(), h.data_ptr(), y.data_ptr())
    assert args[6:] == (2, 64, 16) and h.shape == (4, 128) and y.shape == (4, 64)
    probs32, ends32 = made[-2:]
    assert args[4:6] == (probs32.data_ptr(), ends32.data_ptr())
    assert probs32.dtype == torch.float32 and probs32.shape == (4,) and probs32.is_contiguous()
    assert ends32.dtype == torch.int32 and ends32.tolist() == ends.tolist()
    dout, w2, h_in, probs_in, ends_in = _swiglu_dgrad_inputs()
    dh, dp = sm90_gemm.swiglu_dgrad(dout, w2, h_in, probs_in, ends_in, "128x176_pp_c1x2")
    name, groups, args = calls.pop()
    assert name == "monta_gg_128x176_pp_c1x2_swiglu_dgrad" and groups == 2
    assert args[:4] == (dout.data_ptr(), w2.data_ptr(), h_in.data_ptr(), dh.data_ptr())
    assert args[4:7] == (made[-2].data_ptr(), dp.data_ptr(), made[-1].data_ptr())
    assert args[7:] == (2, 8, 16)
    assert dp.dtype == torch.float32 and torch.count_nonzero(dp) == 0
    monkeypatch.setattr(sm90_gemm, "_run_with_workspace", lambda *a: 3)
    with pytest.raises(RuntimeError, match=r"fc1-with-SwiGLU monta_gg_128x128_pp_c1x2_swiglu_fc1 "
                                           r"\(2 groups, F 64, H 16, 4 rows\): CUTLASS cannot"):
        sm90_gemm.swiglu_fc1(x, w1, probs, ends, "128x128_pp_c1x2")


def test_aligned_instances_for_configs_without_m_clusters():
    """A 2x1 cluster's two row tiles may belong to two experts; CUTLASS's ping-pong kernel
    gives every tile the whole reduction, so no per-expert weight gradient there."""
    kinds = {c: sm90_gemm.aligned_kinds(c) for c in sm90_gemm.CONFIGS}
    assert kinds == {"128x256_c2x1": (), "128x256_c1x2": sm90_gemm.ALIGNED_KINDS,
                     "128x128_c1x2": sm90_gemm.ALIGNED_KINDS,
                     "128x256_c1x1": sm90_gemm.ALIGNED_KINDS,
                     "64x256_pp_c1x1": ("aligned_row", "aligned_col"),
                     "128x128_pp_c1x1": ("aligned_row", "aligned_col"),
                     "128x128_pp_c1x2": ("aligned_row", "aligned_col"), "128x128_pp_c2x1": (),
                     "128x176_pp_c1x2": ("aligned_row", "aligned_col")}
    # rows start at multiples of the tile's rows; the weight gradient needs its K tile
    assert [sm90_gemm.row_alignment(c) for c in ("128x256_c1x1", "64x256_pp_c1x1")] == [128, 64]
    assert sm90_gemm.row_alignment("128x256_c1x1", "wgrad") == 64


def test_asking_for_an_unbuilt_config_names_the_build_tool(no_library):
    a = torch.empty(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="build_sm90_kernels"):
        sm90_gemm.rows(a, torch.empty(2, 8, 8, dtype=torch.bfloat16),
                       torch.tensor([2, 4], dtype=torch.int32), "128x256_c1x2")


def test_asking_for_unbuilt_aligned_instances_says_so(no_library):
    a = torch.empty(256, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="tile-aligned instances of config '128x256_c1x1'"):
        sm90_gemm.rows(a, torch.empty(2, 8, 8, dtype=torch.bfloat16),
                       torch.tensor([128, 256], dtype=torch.int32), "128x256_c1x1", aligned=True)


def test_dims_that_break_16_byte_rows_are_refused_before_any_launch(no_library):
    a = torch.empty(4, 12, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="divisible by 8"):
        sm90_gemm.rows(a, torch.empty(2, 12, 8, dtype=torch.bfloat16),
                       torch.tensor([2, 4], dtype=torch.int32), "128x256_c1x2")
    with pytest.raises(ValueError, match="divisible by 8"):
        sm90_gemm.wgrad(a, torch.empty(4, 20, dtype=torch.bfloat16),
                        torch.tensor([2, 4], dtype=torch.int32), "128x256_c1x2",
                        like=torch.empty(2, 12, 20, dtype=torch.bfloat16))


def test_weights_in_either_orientation_keep_their_storage():
    w = torch.empty(3, 8, 16)
    same, column_major = sm90_gemm._packed(w)
    assert same is w and not column_major
    w_t = torch.empty(3, 16, 8).transpose(1, 2)  # [E, K, N] view of [E, N, K] storage
    same, column_major = sm90_gemm._packed(w_t)
    assert same is w_t and column_major
    sliced = torch.empty(3, 8, 32)[:, :, :16]  # neither: packed into a copy
    assert sm90_gemm.stored_column_major(sliced) is None  # which the weight gradient refuses
    packed, column_major = sm90_gemm._packed(sliced)
    assert packed.is_contiguous() and not column_major
