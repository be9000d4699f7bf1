"""monta/training/pretrain.py's fuse_torch_adam: torch's fused Adam for GPU parameters only
(on a GPU, tests/gpu/test_gpu_moe.py trains, saves and resumes with it)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from monta.training.pretrain import fuse_torch_adam


def _chained(*optimizers):
    """The shape of megatron's ChainedOptimizer: wrappers, each holding a torch optimizer."""
    return SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=o) for o in optimizers])


def test_cpu_parameters_keep_the_default_update():
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))])
    assert fuse_torch_adam(_chained(adam, sgd)) == 0
    assert not adam.param_groups[0]["fused"] and not sgd.param_groups[0].get("fused")


def test_gpu_parameters_get_the_fused_update(monkeypatch):
    """Every group whose parameters are all on a GPU; others and non-Adam optimizers stay.
    (No GPU here: ``is_cuda`` is patched on the parameter class.)"""
    monkeypatch.setattr(torch.nn.Parameter, "is_cuda", property(lambda self: self.dim() > 1))
    gpu, cpu = torch.nn.Parameter(torch.randn(2, 2)), torch.nn.Parameter(torch.randn(2))
    adam = torch.optim.AdamW([{"params": [gpu]}, {"params": [gpu.detach().clone(), cpu]}])
    plain = torch.optim.Adam([torch.nn.Parameter(torch.randn(2, 2))])
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.randn(2, 2))])
    assert fuse_torch_adam(_chained(adam, plain, sgd)) == 2
    assert adam.param_groups[0]["fused"] and not adam.param_groups[0]["foreach"]
    assert not adam.param_groups[1]["fused"]  # not all of its parameters are on the GPU
    assert plain.param_groups[0]["fused"] and not sgd.param_groups[0].get("fused")


def test_an_unchained_optimizer_is_walked_too(monkeypatch):
    monkeypatch.setattr(torch.nn.Parameter, "is_cuda", property(lambda self: True))
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2, 2))])
    assert fuse_torch_adam(SimpleNamespace(optimizer=adam)) == 1
