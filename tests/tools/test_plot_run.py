"""tools/plot_run.py on a real (tiny) training run's TensorBoard events, on a run that logged
only the loss, and on a folder without events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, TINY_MODEL, run_torchrun

PLOTS = ("loss.png", "throughput.png", "expert_load.png", "link_bytes.png")


def plot_run(tensorboard_dir: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "plot_run.py"),
                           "--tensorboard-dir", str(tensorboard_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def assert_real_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert path.stat().st_size > 10_000, (path, path.stat().st_size)
    pixels = imread(path)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 20, (path, len(colours))  # axes, text, lines: not a blank canvas


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, str]:
    """6 iterations on 2 ranks, EP2 over two emulated nodes (so MoE bytes cross a "node"),
    log every 2 iterations, validation every 3."""
    run = tmp_path_factory.mktemp("plot_run")
    result = run_torchrun(
        [*TINY_MODEL, "--mock-data", "--vocab-size", "512", "--expert-model-parallel-size", "2",
         "--moe-token-dispatcher-type", "monta", "--ranks-per-node", "1", "--train-iters", "6",
         "--log-interval", "2", "--eval-interval", "3", "--eval-iters", "1",
         "--tensorboard-dir", str(run / "tb")],
        nproc=2, timeout_s=180)
    assert result.returncode == 0, result.output[-4000:]
    return run, result.output


def test_training_logs_tflops_and_link_bytes(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, output = trained_run
    lines = [line for line in output.splitlines() if line.startswith(" iteration ")]
    assert len(lines) == 3
    assert all("throughput per rank (TFLOP/s): " in line for line in lines)
    assert all("moe intra/inter-node MB per step: 0.000/" in line for line in lines)
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tflops = [e.value for e in events.Scalars("tflops-per-rank")]
    assert len(tflops) == 6 and all(value > 0 for value in tflops)
    assert [e.step for e in events.Scalars("expert-load/layer2/expert7")] == [2, 4, 6]


def test_plots_from_a_real_run(trained_run, tmp_path):
    run, _ = trained_run
    done = plot_run(run / "tb", tmp_path / "plots")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "note:" not in done.stdout
    for name in PLOTS:
        assert_real_png(tmp_path / "plots" / name)


def test_missing_series_are_skipped_with_a_note(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tb")) as writer:
        for step, loss in enumerate((8.0, 7.0, 6.5), 1):
            writer.add_scalar("lm loss", loss, step)
    done = plot_run(tmp_path / "tb", tmp_path / "plots")
    assert done.returncode == 0, done.stderr
    assert_real_png(tmp_path / "plots" / "loss.png")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png"]
    for name in PLOTS[1:]:
        assert f"note: skipping {name}" in done.stdout


def test_no_events_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        done = plot_run(folder, tmp_path / "plots")
        assert done.returncode == 1
        assert done.stderr.startswith("error: no TensorBoard event files")
    assert not (tmp_path / "plots").exists()
