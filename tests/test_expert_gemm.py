"""monta/expert_gemm.py's choice of kernel, with the kernels and the clock replaced (the kernels
themselves are checked on a GPU: tests/gpu/test_gpu_moe.py)."""

from __future__ import annotations

import pytest
import torch

from monta import expert_gemm

WANT = torch.arange(12.0).reshape(3, 4)  # a kernel's result: 3 rows


@pytest.fixture
def fake_kernels(monkeypatch):
    """Candidate → (result, ms); a candidate mapped to an exception raises it."""
    table = {}
    ran = []

    def run(op, candidate, args):
        ran.append(candidate)
        result = table[candidate][0]
        if isinstance(result, Exception):
            raise result
        return result

    def time_ms(fn):
        fn()
        return table[ran[-1]][1]

    monkeypatch.setattr(expert_gemm, "_run", run)
    monkeypatch.setattr(expert_gemm, "_time_ms", time_ms)
    return table


def _tune(monkeypatch, pinned="auto"):
    monkeypatch.setattr(expert_gemm, "ROWS_CANDIDATES", ("torch", "a", "b", "c"))
    # (a, b, row ends): the results are compared up to the last end, here all 3 rows
    args = (None, None, torch.tensor([1, 3], dtype=torch.int32))
    return expert_gemm._tune("rows", ("rows", 0, None, (8, 4, 4), True, 1024, pinned), args)


def test_tuning_keeps_the_fastest_correct_candidate(fake_kernels, monkeypatch):
    fake_kernels.update(torch=(WANT, 3.0), a=(WANT + 1e-4, 2.0), b=(WANT * 2, 0.5),
                        c=(RuntimeError("out of shared memory"), 0.1))
    # b is fastest but wrong (its result is twice torch's), c raises: a wins
    assert _tune(monkeypatch) == "a"
    fake_kernels["a"] = (WANT, 4.0)
    assert _tune(monkeypatch) == "torch"
    # faster, but inside the margin: torch._grouped_mm stays
    fake_kernels["a"] = (WANT, 3.0 * (1 - expert_gemm.TORCH_MARGIN / 2))
    assert _tune(monkeypatch) == "torch"


def test_tuning_compares_rows_up_to_the_last_end_only(fake_kernels, monkeypatch):
    """Padded rows (monta/dispatch/padded_order.py) have a capacity past the last end, which no
    kernel writes: whatever the memory held there must not disqualify a candidate."""
    past = torch.full((2, 4), float("nan"))
    fake_kernels.update(torch=(torch.cat([WANT, past]), 3.0),
                        a=(torch.cat([WANT, past.zero_()]), 1.0), b=(WANT * 2, 0.5),
                        c=(WANT, 4.0))
    assert _tune(monkeypatch) == "a"


def test_pinned_triton_never_times_torch(fake_kernels, monkeypatch):
    fake_kernels.update(torch=(WANT, 0.1), a=(WANT, 2.0), b=(WANT, 1.0),
                        c=(WANT, 3.0))
    assert _tune(monkeypatch, pinned="triton") == "b"


def test_candidates_follow_what_is_built_and_the_pin(monkeypatch):
    from monta import sm90_gemm

    monkeypatch.setattr(sm90_gemm, "built_configs", lambda: tuple(sm90_gemm.CONFIGS))
    monkeypatch.setattr(expert_gemm, "ROWS_CANDIDATES", ("torch", "a"))
    monkeypatch.setattr(expert_gemm, "WGRAD_CANDIDATES", ("torch", "w"))
    sm90 = tuple(expert_gemm.SM90 + c for c in sm90_gemm.CONFIGS)
    assert expert_gemm._candidates("rows", "auto", triton=True, sm90=True) == ("torch", "a", *sm90)
    assert expert_gemm._candidates("rows", "auto", triton=False, sm90=True) == ("torch", *sm90)
    assert expert_gemm._candidates("rows", "auto", triton=False, sm90=False) == ("torch",)
    assert expert_gemm._candidates("wgrad", "auto", triton=True, sm90=True) == ("torch", "w", *sm90)
    assert expert_gemm._candidates("rows", "sm90", triton=True, sm90=True) == sm90
    assert expert_gemm._candidates("rows", "triton", triton=True, sm90=True) == ("a",)
    one, other = list(sm90_gemm.CONFIGS)[:2]
    pin = expert_gemm.SM90 + one
    assert expert_gemm._candidates("rows", pin, triton=True, sm90=True) == (pin,)
    # one config pins the row GEMMs; the weight gradient stays on torch unless a second is named
    assert expert_gemm._candidates("wgrad", pin, triton=True, sm90=True) == ("torch",)
    both = f"{pin},{other}"
    assert expert_gemm._candidates("rows", both, triton=True, sm90=True) == (pin,)
    assert expert_gemm._candidates("wgrad", both, triton=True, sm90=True) == \
        (expert_gemm.SM90 + other,)
    # the input gradient runs on the row config unless a third is named
    assert expert_gemm._candidates("dgrad", both, triton=True, sm90=True) == (pin,)
    three = f"{both},{other}"
    assert expert_gemm._candidates("dgrad", three, triton=True, sm90=True) == \
        (expert_gemm.SM90 + other,)
    assert expert_gemm._candidates("rows", three, triton=True, sm90=True) == (pin,)
    assert expert_gemm._candidates("dgrad", "auto", triton=True, sm90=False) == ("torch", "a")
    # a pin whose kernels are not there falls back to torch rather than to nothing
    assert expert_gemm._candidates("rows", "sm90", triton=True, sm90=False) == ("torch",)
    monkeypatch.setattr(sm90_gemm, "built_configs", lambda: ())  # e.g. --configs built others
    assert expert_gemm._candidates("rows", pin, triton=True, sm90=True) == ("torch",)


def test_alternatives_pick_the_config_whose_column_tiles_fit(monkeypatch):
    """A pin slot ``a|b`` runs each GEMM on the first config whose column tiles, in whole
    clusters, cover its output's columns exactly: fine-grained fc2's input gradient (1408
    columns) on 176-wide tiles, which 128-wide ones in 1x2 clusters compute as 12 for 11."""
    from monta import sm90_gemm

    narrow, wide = "128x128_pp_c1x2", "128x176_pp_c1x2"
    monkeypatch.setattr(sm90_gemm, "built_configs", lambda aligned=False: (narrow, wide))
    slot = f"{narrow}|{wide}"
    assert sm90_gemm.column_span(narrow) == 256 and sm90_gemm.column_span(wide) == 352
    assert expert_gemm.fitting_config(slot, 2048) == narrow
    assert expert_gemm.fitting_config(slot, 1408) == wide
    assert expert_gemm.fitting_config(slot, 1000) == narrow  # neither fits: the first
    assert expert_gemm.fitting_config(f"{wide}|{narrow}", 2816) == wide  # both do: the first
    assert expert_gemm.fitting_config(narrow, 1408) == narrow
    # the columns each GEMM writes: the row GEMMs' N, the weight gradient's stored layout's
    w = torch.empty(4, 1408, 2048, dtype=torch.bfloat16)  # fc2's weights [E, F, H]
    fc2_dgrad = (None, w.transpose(1, 2), None)
    assert expert_gemm._output_columns("dgrad", fc2_dgrad) == 1408
    assert expert_gemm._output_columns("rows", (None, w, None)) == 2048
    assert expert_gemm._output_columns("wgrad", (None, None, None, w)) == 2048
    stored_nk = torch.empty(4, 2048, 1408, dtype=torch.bfloat16).transpose(1, 2)
    assert expert_gemm._output_columns("wgrad", (None, None, None, stored_nk)) == 1408
    pin = f"sm90:{narrow},{narrow},{slot}"
    assert expert_gemm._candidates("dgrad", pin, sm90=True, columns=1408) == ("sm90:" + wide,)
    assert expert_gemm._candidates("dgrad", pin, sm90=True, columns=2048) == ("sm90:" + narrow,)
    assert expert_gemm._candidates("rows", pin, sm90=True, columns=1408) == ("sm90:" + narrow,)
    # an alternative the library lacks is passed over, in the choice and in the default's pin
    monkeypatch.setattr(sm90_gemm, "built_configs", lambda aligned=False: (narrow,))
    assert expert_gemm.fitting_config(slot, 1408) == narrow
    assert expert_gemm._built_slot(slot) == narrow and expert_gemm._built_slot(wide) is None


def test_rows_share_a_tuning_within_a_power_of_two():
    x = torch.empty(1, 4, dtype=torch.bfloat16)
    w = torch.empty(8, 4, 16, dtype=torch.bfloat16)
    keys = {n: expert_gemm._key("rows", x, w, n, "auto") for n in (513, 700, 1024, 1025)}
    assert keys[513] == keys[700] == keys[1024] != keys[1025]
    # the same weight shape stored transposed is another problem for the kernels
    assert expert_gemm._key("rows", x, w.transpose(1, 2).contiguous().transpose(1, 2), 700,
                            "auto") != keys[700]


def test_off_gpu_the_grouped_mm_is_torchs():
    """No CUDA here: nothing is tuned and torch._grouped_mm computes the product."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    counts = torch.tensor([3, 0, 5])
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    try:
        out = expert_gemm.grouped_mm(x, w, ends)
    except RuntimeError as error:  # a torch build without the CPU fallback
        pytest.skip(f"torch._grouped_mm on CPU: {error}")
    want = torch.cat([x[:3].float() @ w[0].float(), x[3:].float() @ w[2].float()])
    assert torch.allclose(out.float(), want, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert torch.count_nonzero(w.grad[1]) == 0 and x.grad.shape == x.shape
    assert expert_gemm.choices() == {}


def test_the_default_runs_what_the_library_holds(monkeypatch):
    """Unpinned: small experts (mean rows up to SMALL_EXPERT_MAX_ROWS) on the small-expert
    configs, larger ones on the large-expert configs; a GEMM whose config is not built on torch,
    and torch for all three without the row config or off a Hopper. The row config is what
    the SwiGLU fusion's default follows (monta/swiglu_gemm.py)."""
    from monta import sm90_gemm

    monkeypatch.delenv("MONTA_GROUPED_GEMM", raising=False)
    monkeypatch.delenv("MONTA_EXPERT_ROW_ALIGNMENT", raising=False)
    monkeypatch.setattr(sm90_gemm, "available", lambda t: True)
    monkeypatch.setattr(sm90_gemm, "_library", object())
    rows, wgrad, dgrad = expert_gemm.SM90_SMALL_EXPERT_CONFIGS
    large = expert_gemm.SM90_LARGE_EXPERT_CONFIGS[0]
    limit, experts = expert_gemm.SMALL_EXPERT_MAX_ROWS, 4
    ends = torch.arange(1, experts + 1, dtype=torch.int32)  # only its length counts
    small_x = torch.empty(limit * experts, 8, dtype=torch.bfloat16)
    large_x = torch.empty(limit * experts + 1, 8, dtype=torch.bfloat16)
    monkeypatch.setattr(sm90_gemm, "_built", tuple(sm90_gemm.CONFIGS))
    assert expert_gemm._pin(small_x, ends) == f"sm90:{rows},{wgrad},{dgrad}"
    # a slot keeps the alternatives that are built
    narrow, wide = dgrad.split(expert_gemm.ALTERNATIVES)
    monkeypatch.setattr(sm90_gemm, "_built", tuple(c for c in sm90_gemm.CONFIGS if c != wide))
    assert expert_gemm._pin(small_x, ends) == f"sm90:{rows},{wgrad},{narrow}"
    monkeypatch.setattr(sm90_gemm, "_built", tuple(sm90_gemm.CONFIGS))
    assert expert_gemm._pin(large_x, ends) == f"sm90:{large}"  # weight gradient on torch
    assert expert_gemm.row_config(small_x, ends) == rows
    assert expert_gemm.row_config(large_x, ends) == large
    monkeypatch.setattr(expert_gemm, "SM90_SMALL_EXPERT_CONFIGS", (rows, large))
    monkeypatch.setattr(sm90_gemm, "_built", (rows,))
    assert expert_gemm._pin(small_x, ends) == f"sm90:{rows}"  # its wgrad config not built
    # an input-gradient config after a missing one is dropped too: places name the GEMMs
    monkeypatch.setattr(expert_gemm, "SM90_SMALL_EXPERT_CONFIGS", (rows, large, rows))
    assert expert_gemm._pin(small_x, ends) == f"sm90:{rows}"
    monkeypatch.setattr(expert_gemm, "SM90_SMALL_EXPERT_CONFIGS", (rows, large))
    assert expert_gemm._pin(large_x, ends) == "torch"  # its row config not built
    assert expert_gemm.row_config(large_x, ends) is None
    monkeypatch.setattr(sm90_gemm, "_built", tuple(sm90_gemm.CONFIGS))
    monkeypatch.setenv("MONTA_GROUPED_GEMM", f"sm90:{large}")
    assert expert_gemm.row_config(small_x, ends) == large
    monkeypatch.setenv("MONTA_GROUPED_GEMM", "sm90:no_such_config")
    assert expert_gemm.row_config(small_x, ends) is None
    for pin in ("torch", "auto", "triton", "sm90"):  # tuned pins choose on their first call
        monkeypatch.setenv("MONTA_GROUPED_GEMM", pin)
        assert expert_gemm.row_config(small_x, ends) is None
    monkeypatch.setenv("MONTA_GROUPED_GEMM", "default")
    monkeypatch.setattr(sm90_gemm, "available", lambda t: False)
    assert expert_gemm._pin(small_x, ends) == "torch"
    assert expert_gemm.row_config(small_x, ends) is None


def test_padded_rows_take_the_aligned_kernels_for_all_three_gemms(monkeypatch):
    """On a Hopper with the library built, rows padded per expert to the aligned row config's
    tile run the row GEMMs there and the weight gradient on the aligned weight-gradient config;
    unpadded rows (or padding to less than the tile) keep the unaligned default; a pin picks
    its own config's alignment."""
    from monta import sm90_gemm

    monkeypatch.delenv("MONTA_GROUPED_GEMM", raising=False)
    monkeypatch.setenv("MONTA_EXPERT_ROW_ALIGNMENT", "tile")
    monkeypatch.setattr(sm90_gemm, "available", lambda t: True)
    monkeypatch.setattr(sm90_gemm, "_library", object())  # "loaded": these say what it holds
    monkeypatch.setattr(sm90_gemm, "_built", tuple(sm90_gemm.CONFIGS))
    aligned = {c: sm90_gemm.aligned_kinds(c) for c in sm90_gemm.CONFIGS
               if sm90_gemm.aligned_kinds(c)}
    monkeypatch.setattr(sm90_gemm, "_aligned_built", aligned)
    x = torch.empty(1, 8, dtype=torch.bfloat16)
    rows, wgrad = expert_gemm.SM90_ALIGNED_CONFIGS
    assert expert_gemm.row_alignment(x) == sm90_gemm.row_alignment(rows) == 64
    unaligned = expert_gemm.SM90 + ",".join(expert_gemm.SM90_SMALL_EXPERT_CONFIGS)
    ends = torch.tensor([128, 384], dtype=torch.int32)
    assert expert_gemm._pin(x, ends) == unaligned
    ends.alignment = 64
    assert expert_gemm._pin(x, ends) == f"{expert_gemm.SM90}{rows},{wgrad}"
    assert expert_gemm._aligned(rows, ends) and expert_gemm._aligned(wgrad, ends, "wgrad")
    assert not expert_gemm._aligned(rows, ends, "wgrad")  # ping-pong: no weight gradient
    assert not expert_gemm._aligned(wgrad, ends)  # its 128-row tiles could straddle experts
    ends.alignment = 32
    assert expert_gemm._pin(x, ends) == unaligned
    monkeypatch.setenv("MONTA_GROUPED_GEMM", "sm90:128x128_c1x2")
    assert expert_gemm.row_alignment(x) == 128
    monkeypatch.setenv("MONTA_GROUPED_GEMM", "sm90:128x256_c2x1")  # no aligned instances
    assert expert_gemm.row_alignment(x) is None
    monkeypatch.setenv("MONTA_GROUPED_GEMM", "torch")
    assert expert_gemm.row_alignment(x) is None
    monkeypatch.delenv("MONTA_GROUPED_GEMM")
    monkeypatch.setattr(sm90_gemm, "_aligned_built", {})
    assert expert_gemm.row_alignment(x) is None


def test_row_alignment_is_none_off_hopper_unless_forced(monkeypatch):
    x = torch.empty(1, 8)
    for asked in ("tile", "0"):
        monkeypatch.setenv("MONTA_EXPERT_ROW_ALIGNMENT", asked)
        assert expert_gemm.row_alignment(x) is None
    monkeypatch.delenv("MONTA_EXPERT_ROW_ALIGNMENT")
    assert expert_gemm.row_alignment(x) is None
    monkeypatch.setenv("MONTA_EXPERT_ROW_ALIGNMENT", "16")
    assert expert_gemm.row_alignment(x) == 16
    monkeypatch.setenv("MONTA_EXPERT_ROW_ALIGNMENT", "-4")
    with pytest.raises(ValueError, match="MONTA_EXPERT_ROW_ALIGNMENT"):
        expert_gemm.row_alignment(x)


def test_with_alignment_restores_the_padded_ends_attribute():
    """What a saved tensor or a moved copy loses comes back on a view of the same ends; ends
    that carry it, or no alignment to restore, pass through as they are."""
    ends = torch.tensor([64, 64, 192], dtype=torch.int32)
    restored = expert_gemm.with_alignment(ends, 64)
    assert restored.alignment == 64 and torch.equal(restored, ends)
    assert restored.data_ptr() == ends.data_ptr() and not hasattr(ends, "alignment")
    assert expert_gemm.with_alignment(restored, 64) is restored
    assert expert_gemm.with_alignment(ends, None) is ends


def test_expert_offsets_keep_padded_ends_and_their_alignment():
    from monta.experts import expert_offsets

    counts = torch.tensor([3, 0, 70])
    counts.row_ends = expert_gemm.with_alignment(torch.tensor([64, 64, 192], dtype=torch.int32),
                                                 64)
    offsets = expert_offsets(counts, torch.device("cpu"))
    assert offsets is counts.row_ends and offsets.alignment == 64
