"""The step report: model FLOPs per step, the Megatron-style log line, and TensorBoard-like
writers (Weights & Biases through a fake ``wandb`` module; wandb itself is not a dependency)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from monta.training import metrics
from monta.training.arguments import parse_args
from monta.training.metrics import TrainingReporter, format_log_line, step_flops
from monta.training.wandb_writer import open_wandb

from tests.conftest import TINY_MODEL


def tiny_args(*extra: str):
    return parse_args([*TINY_MODEL, "--train-iters", "3", "--global-batch-size", "8", *extra])


def test_step_flops_is_the_hand_count():
    """TINY_MODEL: L2 h64, 4 heads / 2 KV groups (q 64, kv 32), SwiGLU ffn 128, E8 top-2,
    s 64, global batch 8, vocabulary 4096 (already a multiple of 128)."""
    attention = 64 * (64 + 2 * 32) + 64 * 64            # QKV + output projection
    router = 64 * 8
    projections = 2 * (attention + router)               # per token
    core = 2 * 64 * 64                                   # 2·s·q per token, causal
    experts = 2 * 3 * 64 * 128 * 2                       # 3 matrices, top-2
    head = 2 * 64 * 4096
    forward_per_token = 2 * (projections + core + experts) + head
    assert step_flops(tiny_args(), 4096) == 3 * 8 * 64 * forward_per_token


def test_step_flops_pads_the_vocabulary_like_megatron():
    # the LM head computes the padded vocabulary: 4000 → 4096 (a multiple of 128 · TP)
    assert step_flops(tiny_args(), 4000) == step_flops(tiny_args(), 4096)
    extra_row = 3 * 8 * 64 * 2 * 64  # fwd+bwd · sequences · s · 2·h per vocabulary row
    assert step_flops(tiny_args(), 4097) - step_flops(tiny_args(), 4096) == extra_row * 128
    tp2 = tiny_args("--tensor-model-parallel-size", "2")
    assert step_flops(tp2, 4097) - step_flops(tp2, 4096) == extra_row * 256


def _scalars(step_time: float = 0.5) -> dict:
    return {"lm loss": 7.5, "lr": 1e-3, "grad-norm": 1.25, "load_balancing_loss": 1.01,
            "tokens/s": 1024.0, "iteration-time": step_time, "consumed samples": 8,
            "global batch size": 8, "skipped iterations": 0, "train_iters": 3}


def test_log_line_has_tflops_and_link_bytes():
    line = format_log_line(2, {**_scalars(), "tflops-per-rank": 0.01234,
                               "moe intra MB": 1.5, "moe inter MB": 0.25})
    assert "iteration        2/       3" in line and "lm loss: 7.500000E+00" in line
    assert "throughput per rank (TFLOP/s): 0.01234" in line
    assert "moe intra/inter-node MB per step: 1.500/0.250" in line
    # without traffic (no MoE bytes measured yet) the field is left out, not zero
    assert "MB per step" not in format_log_line(1, {**_scalars(), "tflops-per-rank": 0.01})


class FakeRun:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []
        self.finished = False

    def log(self, row, step):
        self.rows.append((step, dict(row)))

    def finish(self):
        self.finished = True


@pytest.fixture
def reporting_rank(monkeypatch):
    """The reporter as the last of 4 ranks, without a process group."""
    monkeypatch.setattr(metrics, "is_reporting_rank", lambda: True)
    monkeypatch.setattr(metrics.dist, "get_world_size", lambda: 4)


def test_wandb_gets_one_row_per_step_with_the_training_scalars(reporting_rank, monkeypatch,
                                                                tmp_path, capsys):
    inits = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = tiny_args("--wandb-project", "moe", "--wandb-exp-name", "tiny", "--save",
                     str(tmp_path / "ckpt"))
    reporter = TrainingReporter(args, 0, vocab_size=4096)
    load = torch.tensor([[3.0, 1.0] * 4, [2.0] * 8])                 # [layers, experts]
    traffic = torch.tensor([[1e6, 2e5, 0.01, 0.02], [3e6, 4e5, 0.01, 0.02]])
    reporter.step(1, _scalars(0.5), None, None, log_line=False)
    reporter.step(2, _scalars(0.25), load, traffic, log_line=True)
    reporter.scalars("validation", {"lm loss": 7.0}, 2)
    reporter.close()

    (init,) = inits
    assert init["project"] == "moe" and init["name"] == "tiny" and init["mode"] == "offline"
    assert init["dir"] == str(tmp_path / "ckpt" / "wandb")
    assert (tmp_path / "ckpt" / "wandb").is_dir()
    assert init["config"]["num_experts"] == 8
    run = reporter.writers[0].run
    assert run.finished and [step for step, _ in run.rows] == [1, 2]
    first, second = run.rows[0][1], run.rows[1][1]
    flops = step_flops(args, 4096)
    assert first["tflops-per-rank"] == pytest.approx(flops / 0.5 / 4 / 1e12)
    assert second["tflops-per-rank"] == pytest.approx(flops / 0.25 / 4 / 1e12)
    assert {"lm loss", "lr", "grad-norm", "tokens/s", "iteration-time",
            "load_balancing_loss"} <= set(first)
    assert "train_iters" not in first and not any(k.startswith("expert-load") for k in first)
    assert second["moe-comm/intra-bytes-per-step"] == pytest.approx(4e6)
    assert second["moe-comm/inter-bytes-per-step"] == pytest.approx(6e5)
    assert second["expert-load/layer1/expert0"] == pytest.approx(3 / 16)
    assert second["expert-load/layer2/expert7"] == pytest.approx(1 / 8)
    assert second["validation/lm loss"] == 7.0
    out = capsys.readouterr().out
    assert "throughput per rank (TFLOP/s)" in out and "MB per step: 4.000/0.600" in out


def test_without_wandb_installed_a_warning_and_training_goes_on(reporting_rank, monkeypatch,
                                                                capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    reporter = TrainingReporter(tiny_args("--wandb-project", "moe"), 0, vocab_size=4096)
    assert reporter.writers == []
    reporter.step(1, _scalars(), None, None, log_line=True)
    out = capsys.readouterr().out
    assert out.count("wandb is not installed") == 1 and "continuing without" in out
    assert "iteration        1/" in out


def test_no_wandb_project_means_no_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    warnings = []
    assert open_wandb(tiny_args(), warn=warnings.append) is None and warnings == []
