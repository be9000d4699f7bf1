"""monta/training/checkpointing.py: which saved optimizer state can load under which layout
(megatron's distributed optimizer reshards across data parallelism only). The formats
themselves are exercised by the CPU resume jobs (tests/training/test_pretrain_e2e.py) and, for
the distributed optimizer (CUDA-only), by tests/gpu/test_gpu_moe.py."""

from __future__ import annotations

import pytest

from monta.training.checkpointing import optimizer_layout_mismatch

LAYOUT = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
          "expert_model_parallel_size": 4, "expert_tensor_parallel_size": 2,
          "data_parallel_size": 4}


def _args(distributed: bool, **sizes) -> dict:
    return {**LAYOUT, **sizes, "use_distributed_optimizer": distributed}


@pytest.mark.parametrize("distributed", [False, True])
def test_same_layout_loads(distributed):
    assert optimizer_layout_mismatch(_args(distributed), _args(distributed)) is None


def test_regular_optimizer_state_reshards_freely():
    assert optimizer_layout_mismatch(_args(False), _args(False, tensor_model_parallel_size=1,
                                                         expert_model_parallel_size=8)) is None


def test_distributed_optimizer_state_reshards_across_data_parallel_only():
    assert optimizer_layout_mismatch(_args(True), _args(True, data_parallel_size=8)) is None
    why = optimizer_layout_mismatch(_args(True), _args(True, pipeline_model_parallel_size=2,
                                                       expert_model_parallel_size=2))
    assert "data parallelism only" in why
    assert "--pipeline-model-parallel-size 2 here, 1 in the checkpoint" in why
    assert "--expert-model-parallel-size 2 here, 4 in the checkpoint" in why
    assert "tensor-model" not in why


def test_unset_expert_tensor_parallel_size_counts_as_one():
    saved = _args(True, tensor_model_parallel_size=1, expert_tensor_parallel_size=None)
    assert optimizer_layout_mismatch(saved, _args(True, tensor_model_parallel_size=1,
                                                  expert_tensor_parallel_size=1)) is None


@pytest.mark.parametrize("saved,ours", [(False, True), (True, False)])
def test_switching_the_distributed_optimizer_is_refused(saved, ours):
    why = optimizer_layout_mismatch(_args(saved), _args(ours))
    assert "--use-distributed-optimizer" in why
    assert ("saved with --use" if saved else "saved without --use") in why
