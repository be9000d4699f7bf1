"""The profiler window (monta/training/profiling.py): which iterations it covers, the summary
and the trace it writes, and which ranks profile under the flags and the environment."""

from __future__ import annotations

import json

import pytest
import torch

from monta.training.arguments import parse_args
from monta.training.profiling import NSYS, TORCH, StepProfiler

from tests.conftest import TINY_MODEL


def _iterations(profiler: StepProfiler, count: int) -> dict[int, dict]:
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    summaries = {}
    for iteration in range(1, count + 1):
        profiler.step_started(iteration)
        for _ in range(iteration):  # iteration i runs i matmuls: the window's count shows
            a @ b
        summary = profiler.step_finished(iteration)
        if summary is not None:
            summaries[iteration] = summary
    return summaries


def test_window_summary_and_trace(tmp_path):
    summaries = _iterations(StepProfiler((2, 4), TORCH, trace_dir=str(tmp_path / "tb"),
                                         out=str(tmp_path / "summary.json"), rank=3,
                                         stacks=True), 5)
    assert list(summaries) == [3]  # iterations 2 and 3, reported after the last one
    summary = summaries[3]
    assert summary["rank"] == 3 and summary["iterations"] == [2, 3] and summary["steps"] == 2
    mm = {op["op"]: op for op in summary["top_host_ops"]}["aten::mm"]
    assert mm["calls_per_step"] == pytest.approx((2 + 3) / 2)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    traces = list((tmp_path / "tb").glob("rank3.*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert [e.get("name") for e in events].count("aten::mm") == 5
    frames = [e["name"] for e in events if e.get("cat") == "python_function"]
    assert any("test_profiling.py" in f and "_iterations" in f for f in frames), frames[:20]
    assert not any("test_profiling.py" in op["op"] for op in summary["top_host_ops"])


def test_window_cut_short_is_still_written(tmp_path):
    """Training ends (--train-iters, SIGTERM) inside the window: leaving the ``with`` block
    reports and writes what was profiled."""
    with StepProfiler((3, 9), TORCH, trace_dir=str(tmp_path), rank=1) as profiler:
        assert _iterations(profiler, 4) == {}  # iterations 3 and 4 profiled, window still open
    assert profiler.profiler is None
    (trace,) = tmp_path.glob("rank1.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert [e.get("name") for e in events].count("aten::mm") == 3 + 4
    with StepProfiler((3, 9), TORCH, trace_dir=str(tmp_path / "none")) as profiler:
        _iterations(profiler, 2)  # ended before the window: nothing written
    assert not (tmp_path / "none").exists()


def test_off_without_window():
    assert _iterations(StepProfiler(), 3) == {}
    with pytest.raises(ValueError, match="stop > first"):
        StepProfiler((3, 3))


def _flags(*extra):
    return parse_args([*TINY_MODEL, "--mock-data", *extra])


def test_flags_pick_ranks_window_and_mode(monkeypatch):
    monkeypatch.setenv("MONTA_PROFILE_STEPS", "1:2")  # the flags win over the environment
    args = _flags("--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb",
                  "--profile-step-start", "4", "--profile-step-end", "7", "--profile-ranks", "0",
                  "2")
    on = StepProfiler.from_args(args, rank=2, reporting=False)
    assert (on.window, on.mode, on.trace_dir, on.stacks) == ((5, 8), TORCH, "tb", True)
    assert StepProfiler.from_args(args, rank=1, reporting=True).window is None
    nsys = StepProfiler.from_args(_flags("--profile"), rank=0, reporting=True)
    assert (nsys.window, nsys.mode) == ((11, 13), NSYS)  # megatron's defaults: 10 and 12


def test_environment_profiles_the_reporting_rank_only(monkeypatch, tmp_path):
    monkeypatch.setenv("MONTA_PROFILE_STEPS", "3:5")
    monkeypatch.setenv("MONTA_PROFILE_OUT", str(tmp_path / "p.json"))
    on = StepProfiler.from_args(_flags(), rank=0, reporting=True)
    assert (on.window, on.out, on.trace_dir) == ((3, 5), str(tmp_path / "p.json"), None)
    assert StepProfiler.from_args(_flags(), rank=1, reporting=False).window is None
    monkeypatch.setenv("MONTA_PROFILE_STEPS", "5:5")
    with pytest.raises(ValueError, match="MONTA_PROFILE_STEPS=5:5"):
        StepProfiler.from_args(_flags(), rank=0, reporting=True)


def test_busy_time_counts_overlapping_kernels_once():
    """Kernels on two streams overlap; the GPU is busy for the union of their spans."""
    from monta.training.profiling import busy_us

    assert busy_us([]) == 0
    assert busy_us([(0, 10), (20, 25)]) == 15  # one stream, an idle gap
    assert busy_us([(0, 10), (5, 12), (6, 8)]) == 12  # overlapping and nested
    assert busy_us([(30, 40), (0, 10), (10, 30)]) == 40  # unsorted, touching
