"""monta/training/optimizer.py: torch's fused Adam where torch has the kernel for the
parameters' device (every CPU job of tests/training resumes with it; on a GPU,
tests/gpu/test_gpu_pretrain.py trains, saves and resumes with it, also under the distributed
optimizer), and which saved optimizer state can load under which layout (the distributed
optimizer's reshards across data parallelism only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from monta.training.optimizer import (
    allocate_distributed_adam_state,
    fuse_torch_adam,
    optimizer_layout_mismatch,
)


def _chained(*optimizers):
    """The shape of megatron's ChainedOptimizer: wrappers, each holding a torch optimizer."""
    return SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=o) for o in optimizers])


def test_adam_groups_get_the_fused_update_other_optimizers_do_not():
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    plain = torch.optim.Adam([torch.nn.Parameter(torch.randn(2, 2))])
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))])
    assert fuse_torch_adam(_chained(adam, plain, sgd)) == 2
    assert adam.param_groups[0]["fused"] and not adam.param_groups[0]["foreach"]
    assert plain.param_groups[0]["fused"] and not sgd.param_groups[0].get("fused")


def test_a_group_with_a_parameter_on_an_unfused_device_stays(monkeypatch):
    from monta.training import optimizer

    monkeypatch.setattr(optimizer, "_fused_adam_devices", lambda: ["cuda"])
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    assert fuse_torch_adam(_chained(adam)) == 0
    assert not adam.param_groups[0]["fused"]


def test_an_unchained_optimizer_is_walked_too():
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2, 2))])
    assert fuse_torch_adam(SimpleNamespace(optimizer=adam)) == 1


def test_the_fused_update_equals_the_multi_tensor_one():
    """Same numbers as torch's default update, so checkpoints move between the two."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in start] for _ in range(3)]
    results = []
    for fuse in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        adam = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        if fuse:
            assert fuse_torch_adam(SimpleNamespace(optimizer=adam)) == 1
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            adam.step()
        results.append([p.detach() for p in params])
    for fused, plain in zip(*reversed(results)):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)


def _distributed(inner):
    """A megatron DistributedOptimizer holding ``inner`` (no process groups needed here)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    wrapper = object.__new__(DistributedOptimizer)
    wrapper.optimizer = inner
    return wrapper


@pytest.mark.parametrize("fused", [False, True])
def test_a_fresh_distributed_adam_gets_state_to_load_into(fused):
    """Zeros and step 0, the step where torch's update keeps it (the device when fused), so
    megatron's DistributedOptimizer.state_dict() can read one step before a load."""
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    adam = torch.optim.AdamW(params, fused=fused)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))])  # not distributed
    chained = SimpleNamespace(chained_optimizers=[_distributed(adam),
                                                  SimpleNamespace(optimizer=plain)])
    allocate_distributed_adam_state(chained)
    assert not plain.state
    for p in params:
        state = adam.state[p]
        assert state["step"].item() == 0 and state["step"].dtype == torch.float32
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    for p in params:  # torch's own update accepts it as its state
        p.grad = torch.ones_like(p)
    adam.step()
    assert all(adam.state[p]["step"].item() == 1 for p in params)


def test_existing_adam_state_is_left_alone():
    param = torch.nn.Parameter(torch.randn(3))
    adam = torch.optim.AdamW([param])
    param.grad = torch.ones_like(param)
    adam.step()
    before = adam.state[param]["exp_avg"].clone()
    allocate_distributed_adam_state(_distributed(adam))
    assert torch.equal(adam.state[param]["exp_avg"], before)


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
