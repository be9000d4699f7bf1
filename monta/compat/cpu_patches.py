"""The CPU patches for megatron-core 0.16.1, one small function each.

Why each exists is in its docstring; ``tests/compat/test_cpu_patches.py`` holds one canary per
patch that reproduces the upstream failure with the patch removed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import types
from typing import Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_APPLIED: list[str] = []
# patch name -> [(object, attribute, original value or _MISSING)], so a canary can switch one off
_ORIGINALS: dict[str, list[tuple[object, str, object]]] = {}
_MISSING = object()
_current_patch: list[str] = []


def _replace(obj: object, attr: str, value: object) -> None:
    original = obj.__dict__.get(attr, _MISSING) if isinstance(obj, type) else getattr(
        obj, attr, _MISSING)
    _ORIGINALS.setdefault(_current_patch[-1], []).append((obj, attr, original))
    setattr(obj, attr, value)


def _cpu_current_device() -> torch.device:
    return _CPU


def patch_cuda_current_device() -> None:
    """``torch.cuda.current_device()`` is megatron's buffer device almost everywhere
    (tensor-parallel mappings, linear layers, router, attention, RoPE, p2p buffers, DDP
    buckets, checkpoint saver). On a CPU-only build it raises; return the CPU device."""
    _replace(torch.cuda, "current_device", _cpu_current_device)


def patch_cuda_synchronize() -> None:
    """p2p with ``batch_p2p_sync`` and the async checkpoint writer call
    ``torch.cuda.synchronize()``; CPU collectives are already synchronous."""
    _replace(torch.cuda, "synchronize", lambda device=None: None)


def patch_te_general_gemm() -> None:
    """``moe_utils`` imports ``te_general_gemm`` only inside its TE ``try`` block but the router
    reads it unconditionally, so without TE the router raises ``NameError``."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        _replace(moe_utils, "te_general_gemm", None)


def patch_checkpoint_without_output_fp8() -> None:
    """``CheckpointWithoutOutput(fp8=False)`` sets ``self.fp8 = fp8 is not None``, i.e. True,
    so every selective recompute that discards its output (``--recompute-modules layernorm``,
    ``moe_act``) asks TE's ``FP8GlobalStateManager``, which without TE is a ``NameError``.
    Without TE there is no fp8: record False."""
    from megatron.core.tensor_parallel import random as mrandom

    if mrandom.HAVE_TE:
        return
    original = mrandom.CheckpointWithoutOutput.__init__

    def __init__(self, fp8=False):
        original(self, fp8)
        self.fp8 = False

    _replace(mrandom.CheckpointWithoutOutput, "__init__", __init__)


class _HostStream:
    """Stands in for the dispatcher's class-level CUDA side stream on CPU."""

    def record_event(self):  # pragma: no cover - never reached with the patched method
        raise RuntimeError("host stream has no events")


def _split_sizes_to_host(value):
    if torch.is_tensor(value):
        return value.numpy() if value.dim() > 0 else value
    return value


def _dtoh_and_synchronize_on_host(self, point: str, tokens_per_expert=None):
    # The CUDA version copies split sizes to the host on a side stream; on CPU they are
    # already there but must become numpy arrays, because gloo's all_to_all_single rejects
    # tensors as split sizes.
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        self.input_splits = _split_sizes_to_host(self.input_splits)
        self.output_splits = _split_sizes_to_host(self.output_splits)
        self.output_splits_tp = _split_sizes_to_host(self.output_splits_tp)
    return tokens_per_expert


def patch_alltoall_dispatcher_streams() -> None:
    """``MoEAlltoAllTokenDispatcher`` creates a ``torch.cuda.Stream`` and moves split sizes to
    the host with ``tensor.is_cuda`` checks, so on CPU the splits stay tensors and gloo's
    ``all_to_all_single`` raises. Skip the stream and hand gloo host arrays."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    _replace(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", _HostStream())
    _replace(MoEAlltoAllTokenDispatcher, "_maybe_dtoh_and_synchronize",
             _dtoh_and_synchronize_on_host)


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return _CPU
    return device


class _TorchWithCudaOnHost(types.ModuleType):
    """A view of ``torch`` whose tensor factories put ``device="cuda"`` tensors on the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            def factory(*args, device=None, **kwargs):
                return attr(*args, device=_to_cpu_device(device), **kwargs)

            return factory
        return attr


# Modules with ``device="cuda"`` literals on the paths we run (each one failed without this).
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
)


def patch_cuda_literals() -> None:
    """``device="cuda"`` literals (pipeline schedules' token counter, ``FP32Optimizer``'s
    flags, the default causal mask) cannot be redirected by ``current_device``; give those
    modules a ``torch`` whose factories map CUDA devices to the CPU."""
    import importlib

    host_torch = _TorchWithCudaOnHost()
    for name in _CUDA_LITERAL_MODULES:
        _replace(importlib.import_module(name), "torch", host_torch)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def patch_grad_clip_type_check() -> None:
    """``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``;
    clip host grads the same way (in place, by ``max_norm / (total_norm + 1e-6)``)."""
    from megatron.core.optimizer import optimizer

    _replace(optimizer, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)


def _gather_along_first_dim_padded(input_, group, output_split_sizes=None, use_global_buffer=False):
    """Unequal all-gather for gloo: pad every piece to the largest, gather, then trim."""
    world_size = group.size()
    if world_size == 1:
        return input_
    if output_split_sizes is None:
        output_split_sizes = [input_.size(0)] * world_size
    longest = max(output_split_sizes)
    padded = input_.new_zeros((longest, *input_.shape[1:]))
    padded[: input_.size(0)] = input_
    pieces = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, output_split_sizes)], dim=0)


def patch_unequal_all_gather() -> None:
    """``mappings._gather_along_first_dim`` all-gathers unequal splits (expert-TP with EP>1);
    gloo's ``all_gather`` requires equal sizes."""
    from megatron.core.tensor_parallel import mappings

    _replace(mappings, "_gather_along_first_dim", _gather_along_first_dim_padded)


def patch_torch_norm_sequence_parallel() -> None:
    """``WrappedTorchNorm`` refuses sequence parallelism (the fused kernels live in apex/TE),
    but MoE with TP>1 requires SP. The torch norm is correct under SP as long as its
    parameters' gradients are summed over the TP group, which megatron's grad finalisation
    does for parameters marked ``sequence_parallel``."""
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, **kwargs):
        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            config = copy.copy(config)  # not dataclasses.replace: that re-runs __post_init__
            config.sequence_parallel = False
        norm = original_new(cls, config, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    _replace(torch_norm.WrappedTorchNorm, "__new__", staticmethod(new))


def patch_rng_tracker() -> None:
    """megatron's RNG tracker forks CUDA generator states (dropout inside TP regions, weight
    init). Install a tracker with the same interface that forks the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise ValueError(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if (isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker)
                and mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED and not force_reset):
            return
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    _replace(mrandom, "initialize_rng_tracker", initialize_rng_tracker)
    # model_parallel_cuda_manual_seed also seeds the CUDA generator: nothing to seed on CPU
    _replace(torch.cuda, "manual_seed", lambda seed: None)


def patch_checkpoint_rng_state() -> None:
    """megatron's activation checkpointing (``CheckpointFunction``, behind
    ``--recompute-granularity``) saves the CUDA generator's state beside the CPU's and the
    tracker's, and restores all three for the recompute. Without CUDA there is no such state:
    save none and restore none (the CPU generator and the CPU tracker above are still replayed,
    so dropout masks recompute the same)."""
    from megatron.core.tensor_parallel import random as mrandom

    _replace(mrandom, "_get_cuda_rng_state", lambda *args, **kwargs: None)
    _replace(mrandom, "_set_cuda_rng_state", lambda *args, **kwargs: None)


@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    apply: Callable[[], None]
    cpu_only: bool = True
    """False for upstream bugs that also bite on GPU hosts without Transformer Engine."""


PATCHES: tuple[Patch, ...] = (
    Patch("cuda_current_device", patch_cuda_current_device),
    Patch("cuda_synchronize", patch_cuda_synchronize),
    Patch("te_general_gemm", patch_te_general_gemm, cpu_only=False),
    Patch("checkpoint_without_output_fp8", patch_checkpoint_without_output_fp8, cpu_only=False),
    Patch("alltoall_dispatcher_streams", patch_alltoall_dispatcher_streams),
    Patch("cuda_literals", patch_cuda_literals),
    Patch("grad_clip_type_check", patch_grad_clip_type_check),
    Patch("unequal_all_gather", patch_unequal_all_gather),
    Patch("torch_norm_sequence_parallel", patch_torch_norm_sequence_parallel),
    Patch("rng_tracker", patch_rng_tracker),
    Patch("checkpoint_rng_state", patch_checkpoint_rng_state),
)


def apply_cpu_patches(force: bool = False) -> list[str]:
    """Apply each needed patch once: all of them on hosts without CUDA (or when ``force``),
    only the ``cpu_only=False`` ones on GPU hosts.

    Returns:
        The names of the patches in effect.
    """
    on_cpu = force or not torch.cuda.is_available()
    for patch in PATCHES:
        if patch.name not in _APPLIED and (on_cpu or not patch.cpu_only):
            _apply(patch)
    logger.debug("megatron-core CPU patches applied: %s", ", ".join(_APPLIED))
    return list(_APPLIED)


def applied_patches() -> list[str]:
    return list(_APPLIED)


def _apply(patch: Patch) -> None:
    _current_patch.append(patch.name)
    try:
        patch.apply()
    finally:
        _current_patch.pop()
    _APPLIED.append(patch.name)


@contextlib.contextmanager
def patch_disabled(name: str):
    """Temporarily restore megatron-core's original code for one applied patch (canary tests)."""
    if name not in _APPLIED:
        raise ValueError(f"patch {name!r} is not applied; applied: {_APPLIED}")
    replaced = _ORIGINALS.pop(name, [])
    current = [(obj, attr, getattr(obj, attr) if not isinstance(obj, type)
                else obj.__dict__[attr]) for obj, attr, _ in replaced]
    for obj, attr, original in reversed(replaced):
        if original is _MISSING:
            delattr(obj, attr)
        else:
            setattr(obj, attr, original)
    try:
        yield
    finally:
        for obj, attr, value in current:
            setattr(obj, attr, value)
        _ORIGINALS[name] = replaced
