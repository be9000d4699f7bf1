"""The optimizer megatron-core builds without TE or apex, made fast and checkpointable.

Megatron-core falls back to ``torch.optim.AdamW`` when neither TE's nor apex's FusedAdam
imports. Two things then need MoNTA's help: the update itself (:func:`fuse_torch_adam`), and
the distributed optimizer's checkpoints (``--use-distributed-optimizer``, CUDA only), which in
megatron-core 0.16 neither save in their default format nor load into a fresh torch Adam
(:func:`checkpoint_metadata`, :func:`allocate_distributed_adam_state`); the format they do
save in reshards across data parallelism only (:func:`optimizer_layout_mismatch`).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def fuse_torch_adam(optimizer) -> int:
    """Switch the torch Adam(W) under megatron's optimizer to ``fused=True`` where torch has a
    fused kernel for its parameters' device (CUDA, CPU, ...); returns how many param groups
    changed.

    Without TE or apex, megatron-core falls back to ``torch.optim.AdamW`` with torch's default,
    the multi-tensor (``foreach``) update: on an H200 it took ~18 ms of the 0.82 B-parameter
    training iteration (bench/gpu_moe.py's profile). torch's fused kernel does the same update
    in one pass over each tensor set, as TE's and apex's FusedAdam (megatron's usual choice)
    do; the iteration went from 613.8 to 610.1 ms (bench/results/gpu_train_fusions.json).
    Set before any state exists or loads, so each ``step`` lives on the parameters' device as
    the fused kernel wants (torch's ``load_state_dict`` moves loaded ones there too)."""
    devices = set(_fused_adam_devices())
    changed = 0
    for _, inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            if group["params"] and all(p.device.type in devices and p.is_floating_point()
                                       for p in group["params"]):
                group["fused"], group["foreach"] = True, False
                changed += 1
    if changed:
        logger.info("optimizer: torch Adam with fused=True on %d param group(s)", changed)
    return changed


def _torch_adams(optimizer):
    """(megatron wrapper, torch Adam) for each torch Adam(W) under ``optimizer`` (a
    ``ChainedOptimizer`` or one megatron optimizer)."""
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):  # AdamW is an Adam
            yield wrapper, inner


def _fused_adam_devices() -> list[str]:
    try:  # torch's own list (private; stable since 2.2)
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return _get_fused_kernels_supported_devices()
    except ImportError:
        return ["cuda"]


def checkpoint_metadata(args) -> dict | None:
    """How megatron's distributed optimizer lays out its state in a checkpoint:
    ``dp_reshardable``, Megatron-LM's default (each rank saves its own shard; a resume may
    change the data-parallel size, not TP/PP/EP). Its other formats do not work here:
    ``fully_sharded_model_space`` (the default without metadata) needs
    ``ShardedTensor.flattened_range``, which megatron-core 0.16's dist_checkpointing refuses,
    and ``fully_reshardable`` loads no per-parameter ``step``, which torch's Adam keeps."""
    if getattr(args, "use_distributed_optimizer", False):
        return {"distrib_optim_sharding_type": "dp_reshardable"}
    return None


def allocate_distributed_adam_state(optimizer) -> None:
    """Give a fresh torch Adam under megatron's distributed optimizer its state tensors (zeros,
    step 0) before a load. Without TE or apex, ``DistributedOptimizer.state_dict()``, which
    ``sharded_state_dict(is_loading=True)`` calls first, reads every parameter's ``step`` and
    asserts there is exactly one value, so on an optimizer that never stepped it fails; the
    load then overwrites these tensors in place (megatron's "already initialized" path)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for wrapper, inner in _torch_adams(optimizer):
        if not isinstance(wrapper, DistributedOptimizer) or inner.state:
            continue
        for group in inner.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for param in group["params"]:
                inner.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32,
                                        device=param.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param)}


# Model-parallel sizes that must match for distributed-optimizer state to load (it reshards
# across data parallelism only, see checkpoint_metadata).
DISTRIBUTED_OPTIMIZER_LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                "expert_model_parallel_size", "expert_tensor_parallel_size")


def optimizer_layout_mismatch(saved: dict, ours: dict) -> str | None:
    """Why optimizer state saved under ``saved`` args cannot load under ``ours``, or None."""
    was, now = (bool(a.get("use_distributed_optimizer")) for a in (saved, ours))
    if was != now:
        return (f"its optimizer state was saved {'with' if was else 'without'} "
                f"--use-distributed-optimizer and this run is {'with' if now else 'without'} "
                f"it (the two store it differently)")
    if not now:
        return None
    diffs = [f"--{name.replace('_', '-')} {ours.get(name)} here, {saved.get(name)} in the "
             f"checkpoint" for name in DISTRIBUTED_OPTIMIZER_LAYOUT
             if (ours.get(name) or 1) != (saved.get(name) or 1)]
    if diffs:
        return ("--use-distributed-optimizer state reshards across data parallelism only: "
                + "; ".join(diffs))
    return None
