"""GPU tier: `torchrun --nproc-per-node 1 pretrain_moe.py --bf16` end to end on one GPU (run on
a CUDA machine; skipped elsewhere): it learns, saves and resumes, with and without grouped
experts; the run without them under megatron's distributed optimizer.

    python -m pytest tests/gpu -m gpu -v        # on a machine with one or more GPUs
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]


def _train_save_resume(tmp_path, command: list[str], iterations: int = 30,
                       more: int = 10) -> str:
    """Run ``command`` (a `torchrun pretrain_moe.py` job logging its loss every iteration to
    TensorBoard) for ``iterations`` steps with a save at the end, check it learned, resume it for
    ``more`` steps from that checkpoint and check it carried on. Returns the first run's log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(run: str, job: list[str]) -> tuple[dict, str]:
        job = [*job, "--tensorboard-dir", str(tmp_path / run), "--save", str(tmp_path / "ckpt")]
        env = {**os.environ, "MONTA_LOG_LEVEL": "INFO"}  # to see which Adam update runs
        done = subprocess.run(job, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=env)
        print(done.stdout[-3000:])
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        events = EventAccumulator(str(tmp_path / run), size_guidance={"scalars": 0})
        events.Reload()
        return {e.step: e.value for e in events.Scalars("lm loss")}, done.stdout + done.stderr

    first, log = losses("tb", [*command, "--train-iters", str(iterations)])
    assert sorted(first) == list(range(1, iterations + 1))
    assert first[iterations] < first[1] - 0.5, first
    tracker = tmp_path / "ckpt" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text() == str(iterations)
    # the optimizer's moments and steps load back onto the GPU and training goes on
    after, _ = losses("tb_resumed", [*command, "--train-iters", str(iterations + more),
                                     "--load", str(tmp_path / "ckpt")])
    assert sorted(after) == list(range(iterations + 1, iterations + more + 1))
    assert max(after.values()) < first[1] - 0.5, after  # carried on, did not restart
    assert tracker.read_text() == str(iterations + more)
    return log


def test_pretrain_bf16_on_one_gpu(tmp_path, tiny_data_prefix, tokenizer_model):
    """`torchrun --nproc-per-node 1 pretrain_moe.py --bf16` with the monta dispatcher and
    megatron's distributed optimizer (torch's fused Adam inside), on the bundled corpus (so
    there is something to learn); it learns, saves and resumes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", "29544", str(REPO / "pretrain_moe.py"), "--bf16",
               "--use-distributed-optimizer",
               "--data-path", tiny_data_prefix, "--tokenizer-model", tokenizer_model,
               "--num-layers", "2", "--hidden-size",
               "256", "--num-attention-heads", "4", "--ffn-hidden-size", "512", "--swiglu",
               "--disable-bias-linear", "--untie-embeddings-and-output-weights",
               "--num-experts", "8", "--moe-router-topk", "2", "--moe-token-dispatcher-type",
               "monta", "--monta-chunks", "2", "--seq-length", "128", "--micro-batch-size", "4",
               "--lr", "3e-3", "--log-interval", "10", "--eval-iters", "0", "--no-progress-bar"]
    log = _train_save_resume(tmp_path, command)
    assert "torch Adam with fused=True" in log


def test_pretrain_bf16_grouped_gemm_on_one_gpu(tmp_path, tiny_data_prefix, tokenizer_model):
    """`torchrun --nproc-per-node 1 pretrain_moe.py --bf16 --moe-grouped-gemm`: grouped experts,
    the MoNTA dispatcher's one-rank path, SDPA attention, torch's fused Adam; it learns, saves
    and resumes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", "29545", str(REPO / "pretrain_moe.py"), "--bf16",
               "--moe-grouped-gemm", "--data-path", tiny_data_prefix, "--tokenizer-model",
               tokenizer_model, "--num-layers", "2", "--hidden-size", "256",
               "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups",
               "2", "--ffn-hidden-size", "512", "--swiglu", "--disable-bias-linear",
               "--untie-embeddings-and-output-weights", "--normalization", "RMSNorm",
               "--num-experts", "8", "--moe-router-topk", "2", "--moe-token-dispatcher-type",
               "monta", "--seq-length", "128", "--micro-batch-size", "4",
               "--lr", "3e-3", "--log-interval", "10", "--eval-iters", "0", "--no-progress-bar"]
    log = _train_save_resume(tmp_path, command)
    assert "peak memory (GiB)" in log
    assert "torch Adam with fused=True" in log


def test_pretrain_recompute_on_one_gpu_trains_the_same_function(tmp_path, tiny_data_prefix,
                                                                tokenizer_model):
    """The recompute settings the planner picks (monta/planner/auto.py) run on a GPU in bf16
    with grouped experts: full, and selective over the norms, the experts' activation and the
    MoE layer (megatron's CheckpointWithoutOutput under monta/compat's fp8-flag patch). Each
    reruns the same function: its losses match the run without recompute to bf16 precision
    (the GPU's scatter-adds are not bitwise deterministic)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
            "--master-port", "29546", str(REPO / "pretrain_moe.py"), "--bf16",
            "--moe-grouped-gemm", "--data-path", tiny_data_prefix, "--tokenizer-model",
            tokenizer_model, "--num-layers", "2", "--hidden-size", "256",
            "--num-attention-heads", "4", "--ffn-hidden-size", "512", "--swiglu",
            "--disable-bias-linear", "--normalization", "RMSNorm", "--num-experts", "8",
            "--moe-router-topk", "2", "--moe-token-dispatcher-type", "monta",
            "--seq-length", "128", "--micro-batch-size", "4", "--lr", "3e-3",
            "--train-iters", "8", "--log-interval", "1", "--eval-iters", "0",
            "--no-progress-bar", "--seed", "7"]
    settings = {"none": [],
                "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                         "--recompute-num-layers", "1"],
                "selective": ["--recompute-granularity", "selective", "--recompute-modules",
                              "layernorm", "moe_act", "moe"]}
    losses = {}
    for name, flags in settings.items():
        board = tmp_path / name
        done = subprocess.run([*base, *flags, "--tensorboard-dir", str(board)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, name + done.stdout[-3000:] + done.stderr[-3000:]
        events = EventAccumulator(str(board), size_guidance={"scalars": 0})
        events.Reload()
        losses[name] = [e.value for e in events.Scalars("lm loss")]
    assert len(losses["none"]) == 8
    for name in ("full", "selective"):
        assert len(losses[name]) == 8
        for got, want in zip(losses[name], losses["none"]):
            assert abs(got - want) <= 2e-2 * abs(want), (name, losses)
