"""monta/training/pretrain.py's fuse_torch_adam: torch's fused Adam where torch has the kernel
for the parameters' device (every CPU job of tests/training resumes with it; on a GPU,
tests/gpu/test_gpu_moe.py trains, saves and resumes with it)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from monta.training.pretrain import fuse_torch_adam


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
    from monta.training import pretrain

    monkeypatch.setattr(pretrain, "_fused_adam_devices", lambda: ["cuda"])
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
