"""Compatibility shims that let megatron-core 0.16.1 run on hosts without CUDA.

megatron-core assumes a GPU in a handful of places (buffer devices, side streams, RNG
states, ``device="cuda"`` literals). :func:`apply_cpu_patches` fixes exactly those, and
only when ``torch.cuda.is_available()`` is False; on a GPU host it does nothing. Every
patch has a canary test in ``tests/compat`` that fails once megatron-core stops needing
it, so this layer shrinks as upstream improves.
"""

from monta.compat.cpu_patches import PATCHES, apply_cpu_patches, applied_patches, patch_disabled

__all__ = ["PATCHES", "apply_cpu_patches", "applied_patches", "patch_disabled"]
