"""MoNTA's CUTLASS grouped GEMMs for Hopper (``monta/csrc/sm90_grouped_gemm.cuh``), through ctypes.

``torch._grouped_mm`` builds one kernel per problem class: on the experts' shapes, 128×256
tiles in 2×1 clusters, so an expert's rows are paid for in multiples of 256. With fine-grained
experts (~770 rows each) about half of them pay for 1024 rows. The same CUTLASS collectives
with other tile and cluster shapes move that granularity to 128 or 64 rows.
:mod:`monta.expert_gemm` runs the row GEMMs on one of them by default when the library is
built, and can time all of them against torch (``MONTA_GROUPED_GEMM=auto``).

The kernels are compiled ahead of time by ``tools/build_sm90_kernels.py`` (CUDA's compiler and
CUTLASS's headers come from the package registry) into ``monta/_build/``. The library has a C
interface only, so it does not depend on the torch build it runs under. Without it (CPU installs,
other GPUs) :func:`available` is False and nothing here is used.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

# name: (tile M, tile N, tile K, cluster M, cluster N, ping-pong schedule)
CONFIGS = {
    "128x256_c2x1": (128, 256, 64, 2, 1, False),  # torch._grouped_mm's large-problem kernel
    "128x256_c1x2": (128, 256, 64, 1, 2, False),
    "128x128_c1x2": (128, 128, 64, 1, 2, False),
    "128x256_c1x1": (128, 256, 64, 1, 1, False),
    "64x256_pp_c1x1": (64, 256, 64, 1, 1, True),
}
# Instances per config: row-grouped with B stored row- or column-major, and the weight gradient.
KINDS = ("row", "col", "wgrad")
LIBRARY = Path(__file__).resolve().parent / "_build" / "libmonta_sm90_gemm.so"
ERRORS = {1: "workspace too small", 2: "more than 1024 groups", 3: "CUTLASS cannot implement",
          4: "CUTLASS initialize failed", 5: "CUTLASS run failed", 6: "CUDA launch error"}

_library = None
_built: tuple = ()


def symbol(config: str, kind: str) -> str:
    return f"monta_gg_{config}_{kind}"


def _load():
    """The library (None when it is not built); also notes which configs it holds (a build may
    hold a subset: ``tools/build_sm90_kernels.py --configs``)."""
    global _library, _built
    if _library is None:
        path = Path(os.environ.get("MONTA_SM90_GEMM_LIBRARY", LIBRARY))
        _library = False
        if path.exists():
            library = ctypes.CDLL(str(path))
            built = []
            for config in CONFIGS:
                names = [symbol(config, kind) for kind in KINDS]
                if not all(hasattr(library, f"{name}_run") for name in names):
                    continue
                for name in names:
                    getattr(library, f"{name}_workspace").restype = ctypes.c_int64
                    getattr(library, f"{name}_workspace").argtypes = [ctypes.c_int]
                    run = getattr(library, f"{name}_run")
                    run.restype = ctypes.c_int
                    run.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 \
                        + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
                built.append(config)
            _library, _built = library, tuple(built)
    return _library or None


def built_configs() -> tuple:
    """The configs of :data:`CONFIGS` the library holds (empty when it is not built)."""
    _load()
    return _built


@functools.lru_cache(maxsize=None)
def _hopper(device: int) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def available(t: torch.Tensor) -> bool:
    """Built, and ``t`` lives on a Hopper GPU (asked on every expert GEMM: cached per device)."""
    return (t.is_cuda and t.dtype == torch.bfloat16 and _hopper(t.device.index)
            and bool(built_configs()))


def _column_major(w: torch.Tensor) -> bool | None:
    """How ``w`` [E, K, N] is packed per expert: False stored [E, K, N], True stored [E, N, K],
    None neither (a strided view)."""
    experts, k, n = w.shape
    if w.stride() == (k * n, n, 1):
        return False
    if w.stride() == (k * n, 1, k):
        return True
    return None


def _packed(b: torch.Tensor):
    """``b`` [E, K, N] as (tensor, column_major), packed into a copy if it is neither."""
    column_major = _column_major(b)
    return (b, column_major) if column_major is not None else (b.contiguous(), False)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride() == (t.size(1), 1) else t.contiguous()


def rows(a: torch.Tensor, b: torch.Tensor, row_ends: torch.Tensor, config: str,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[rows_e] = a[rows_e] @ b[e]``, like ``torch._grouped_mm(a, b, offs=row_ends)``:
    ``a`` [n, K] bf16, ``b`` [E, K, N] in either orientation, ``row_ends`` int32 [E] on the
    device, ``out`` (optional) a contiguous [n, N] bf16 tensor to write. Rows past
    ``row_ends[-1]`` are left unwritten, as torch leaves them."""
    library = _load()
    b, column_major = _packed(b)
    experts, k, n = b.shape
    _check(config, k, n)
    a = _row_major(a)
    if out is None:
        out = torch.empty(a.size(0), n, device=a.device, dtype=a.dtype)
    elif out.shape != (a.size(0), n) or not out.is_contiguous() or out.dtype != a.dtype:
        raise ValueError(f"out must be a contiguous {a.dtype} [{a.size(0)}, {n}] tensor, "
                         f"got {out.dtype} {list(out.shape)}")
    _call(library, symbol(config, "col" if column_major else "row"), a, b, out, row_ends,
          experts, n, k)
    return out


def wgrad(x: torch.Tensor, dy: torch.Tensor, row_ends: torch.Tensor, config: str,
          like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dw[e] = x[rows_e]ᵀ @ dy[rows_e]`` (the weight gradient of :func:`rows`' forward):
    ``x`` [n, K], ``dy`` [n, N] bf16; the result (``out`` if given) has ``like``'s shape
    [E, K, N] and strides (``like`` stored [E, K, N] or [E, N, K]). An expert with no rows gets
    zeros."""
    library = _load()
    experts, k, n = like.shape
    _check(config, k, n)
    column_major = _column_major(like)
    if column_major is None:
        raise ValueError(f"weights must be packed [E, K, N] or [E, N, K], got strides "
                         f"{like.stride()}")
    if out is None:
        out = torch.empty_strided(like.shape, like.stride(), device=x.device, dtype=x.dtype)
    if out.shape != like.shape or out.stride() != like.stride() or out.dtype != x.dtype:
        raise ValueError("out must have like's shape, strides and x's dtype")
    x, dy = _row_major(x), _row_major(dy)
    if column_major:  # stored [E, N, K]: dw[e]ᵀ = dyᵀ x
        _call(library, symbol(config, "wgrad"), dy, x, out, row_ends, experts, n, k)
    else:  # stored [E, K, N]: dw[e] = xᵀ dy
        _call(library, symbol(config, "wgrad"), x, dy, out, row_ends, experts, k, n)
    return out


def _check(config: str, *dims: int):
    if any(d % 8 for d in dims):  # 16-byte rows for TMA, as torch._grouped_mm requires too
        raise ValueError(f"sm90 grouped GEMM needs dims divisible by 8 (bf16), got {dims}")
    if config not in _built:
        raise ValueError(f"sm90 grouped-GEMM config {config!r} is not in the library "
                         f"(built: {', '.join(_built) or 'none'}; tools/build_sm90_kernels.py)")


@functools.lru_cache(maxsize=None)
def _workspace_bytes(name: str, groups: int, device: int) -> int:
    """CUTLASS's argument arrays + workspace for ``groups`` groups: a function of the instance,
    the group count and the current device's SM count only, so asked once, not per GEMM."""
    return getattr(_load(), f"{name}_workspace")(groups)


def _call(library, name, a, b, out, row_ends, groups, dim0, dim1):
    if row_ends.dtype != torch.int32:
        row_ends = row_ends.to(torch.int32)
    workspace = torch.empty(_workspace_bytes(name, groups, torch.cuda.current_device()),
                            device=a.device, dtype=torch.uint8)
    status = getattr(library, f"{name}_run")(
        a.data_ptr(), b.data_ptr(), out.data_ptr(), row_ends.data_ptr(), groups, dim0, dim1,
        workspace.data_ptr(), workspace.numel(), torch.cuda.current_stream(a.device).cuda_stream)
    if status:
        raise RuntimeError(f"MoNTA sm90 grouped GEMM {name} ({groups} groups, dims {dim0}x{dim1},"
                           f" A {list(a.shape)}): {ERRORS.get(status, status)}")
