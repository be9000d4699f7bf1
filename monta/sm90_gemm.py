"""MoNTA's CUTLASS grouped GEMMs for Hopper (``monta/csrc/sm90_grouped_gemm.cuh``), through ctypes.

``torch._grouped_mm`` builds one kernel per problem class: on the experts' shapes, 128×256
tiles in 2×1 clusters, so an expert's rows are paid for in multiples of 256. With fine-grained
experts (~770 rows each) about half of them pay for 1024 rows. The same CUTLASS collectives
with other tile and cluster shapes move that granularity to 128 or 64 rows.
:mod:`monta.expert_gemm` runs its default GEMMs on them when the library is built (for small
experts all three on 128×128 ping-pong tiles, whose epilogues overlap the other tile's
mainloop), and can time all of them against torch (``MONTA_GROUPED_GEMM=auto``).

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
    # ping-pong on 128x128 tiles: each consumer warpgroup owns a whole tile, so one tile's
    # epilogue runs while the other's mainloop does (the weight gradients' K of ~768 rows
    # leaves only ~12 k-blocks per tile for a cooperative kernel to hide its epilogue behind)
    "128x128_pp_c1x1": (128, 128, 64, 1, 1, True),
    "128x128_pp_c1x2": (128, 128, 64, 1, 2, True),
    "128x128_pp_c2x1": (128, 128, 64, 2, 1, True),
    # 176 columns cover fc2's 1408 at fine-grained shapes in 8 tiles, where 128 takes 11 (a 1x2
    # cluster computes 12); it wins only on a K-major B (the input gradients): an N-major one
    # gets a 32-byte swizzle, 176 being no multiple of 64 elements, and runs ~1.5x slower
    "128x176_pp_c1x2": (128, 176, 64, 1, 2, True),
}
# Instances per config: row-grouped with B stored row- or column-major, and the weight gradient.
KINDS = ("row", "col", "wgrad")
# The same three on tile-aligned expert rows (monta/csrc/sm90_aligned_gemm.cuh), for configs whose
# clusters are 1 along M (a 2x1 cluster's two row tiles could belong to two experts); the weight
# gradient only for cooperative ones (CUTLASS's ping-pong kernel gives every tile the whole
# reduction, not an expert's rows).
ALIGNED_KINDS = ("aligned_row", "aligned_col", "aligned_wgrad")
# Configs that also get fc2's input gradient with SwiGLU·prob's backward in its epilogue
# (monta/csrc/sm90_swiglu_dgrad.cuh): the small-expert input-gradient configs, the kernels that
# input gradient runs on unfused.
SWIGLU_DGRAD_CONFIGS = ("128x128_pp_c1x2", "128x176_pp_c1x2")
SWIGLU_DGRAD_KIND = "swiglu_dgrad"
# Configs that also get fc1's forward with SwiGLU·prob in its epilogue
# (monta/csrc/sm90_swiglu_fc1.cuh): the small-expert row config, whose unfused fc1 beat Triton's
# fused one. On the large-expert one (128x256_c1x2, built and measured) it was no faster than
# either Triton's fused fc1 or none (bench/results/gpu_expert_kernels_runs/
# ffn_large_sm90_fc1_5936c08.json), so it is not built there.
SWIGLU_FC1_CONFIGS = ("128x128_pp_c1x2",)
SWIGLU_FC1_KIND = "swiglu_fc1"
# The fused kinds: what they are, their configs and the C arguments of their _run before the
# workspace (pointers, ints).
FUSED_KINDS = {
    # dout, w2, h, dh, probs, dprobs, ends; groups, ffn, hidden
    SWIGLU_DGRAD_KIND: ("SwiGLU input-gradient", SWIGLU_DGRAD_CONFIGS, 7, 3),
    # x, w1, h, y, probs, ends; groups, ffn, hidden
    SWIGLU_FC1_KIND: ("fc1-with-SwiGLU", SWIGLU_FC1_CONFIGS, 6, 3),
}
# Row tiles per band of the aligned kernels' tile order (see ExpertTileScheduler::place).
BAND_M = int(os.environ.get("MONTA_SM90_BAND_M", 8))


def aligned_kinds(config: str) -> tuple:
    """The tile-aligned kinds ``config`` gets (see :data:`ALIGNED_KINDS`); empty if none."""
    _, _, _, cluster_m, _, pingpong = CONFIGS[config]
    if cluster_m != 1:
        return ()
    return ALIGNED_KINDS[:2] if pingpong else ALIGNED_KINDS


LIBRARY = Path(__file__).resolve().parent / "_build" / "libmonta_sm90_gemm.so"
ERRORS = {1: "workspace too small", 2: "more than 1024 groups", 3: "CUTLASS cannot implement",
          4: "CUTLASS initialize failed", 5: "CUTLASS run failed", 6: "CUDA launch error",
          7: "the kernel asks for a workspace"}

_library = None
_built: tuple = ()
_aligned_built: dict = {}  # config -> its tile-aligned kinds in the library
_fused_built: dict = {}  # fused kind -> the configs whose instance of it the library holds


def symbol(config: str, kind: str) -> str:
    return f"monta_gg_{config}_{kind}"


def _load():
    """The library (None when it is not built); also notes which configs it holds (a build may
    hold a subset: ``tools/build_sm90_kernels.py --configs``)."""
    global _library, _built, _aligned_built, _fused_built
    if _library is None:
        path = Path(os.environ.get("MONTA_SM90_GEMM_LIBRARY", LIBRARY))
        _library = False
        if path.exists():
            library = ctypes.CDLL(str(path))
            _built = tuple(c for c in CONFIGS if _bind(library, c, KINDS, aligned=False))
            _aligned_built = {c: aligned_kinds(c) for c in CONFIGS
                              if aligned_kinds(c) and _bind(library, c, aligned_kinds(c), True)}
            _fused_built = {kind: tuple(c for c in configs
                                        if _bind_fused(library, symbol(c, kind), pointers, ints))
                            for kind, (_, configs, pointers, ints) in FUSED_KINDS.items()}
            _library = library
    return _library or None


def _bind(library, config: str, kinds, aligned: bool) -> bool:
    """Declare the C signatures of ``config``'s instances of ``kinds``; False if any is absent."""
    names = [symbol(config, kind) for kind in kinds]
    if not all(hasattr(library, f"{name}_run") for name in names):
        return False
    for name in names:
        if aligned:  # a, b, d, ends, groups, capacity, dim0, dim1, band, stream
            run = getattr(library, f"{name}_run")
            run.restype = ctypes.c_int
            run.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.c_void_p]
        else:  # a, b, d, ends, groups, dim0, dim1
            _declare_with_workspace(library, name, [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3)
    return True


def _bind_fused(library, name: str, pointers: int, ints: int) -> bool:
    if not hasattr(library, f"{name}_run"):
        return False
    _declare_with_workspace(library, name, [ctypes.c_void_p] * pointers + [ctypes.c_int] * ints)
    return True


def _declare_with_workspace(library, name: str, own_args: list) -> None:
    """``name``'s C signatures: ``_workspace(groups)`` and ``_run(*own_args, workspace,
    workspace bytes, stream)`` (see :func:`_run_with_workspace`)."""
    workspace = getattr(library, f"{name}_workspace")
    workspace.restype, workspace.argtypes = ctypes.c_int64, [ctypes.c_int]
    run = getattr(library, f"{name}_run")
    run.restype = ctypes.c_int
    run.argtypes = own_args + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]


def fused_built(kind: str, config: str) -> bool:
    """Whether the library holds ``config``'s instance of the fused ``kind``
    (:data:`FUSED_KINDS`)."""
    _load()
    return config in _fused_built.get(kind, ())


def swiglu_dgrad_built(config: str) -> bool:
    """Whether the library holds ``config``'s fc2 input gradient with SwiGLU·prob's backward."""
    return fused_built(SWIGLU_DGRAD_KIND, config)


def swiglu_fc1_built(config: str) -> bool:
    """Whether the library holds ``config``'s fc1 forward with SwiGLU·prob in its epilogue."""
    return fused_built(SWIGLU_FC1_KIND, config)


def paired_width(config: str) -> int:
    """The runs of gate and of up columns in the ``h`` that ``config``'s fused fc1 writes: half
    its tile's columns (see :func:`swiglu_fc1`)."""
    return CONFIGS[config][1] // 2


def built_configs(aligned: bool = False) -> tuple:
    """The configs of :data:`CONFIGS` the library holds (empty when it is not built); with
    ``aligned``, those whose tile-aligned row GEMMs it holds."""
    _load()
    return tuple(_aligned_built) if aligned else _built


def aligned_wgrad_built(config: str) -> bool:
    """Whether the library holds ``config``'s tile-aligned weight gradient."""
    _load()
    return "aligned_wgrad" in _aligned_built.get(config, ())


def row_alignment(config: str, op: str = "rows") -> int:
    """What each expert's first row must be a multiple of for ``config``'s aligned instance of
    ``op``: the tile's rows for the row GEMMs, the tile's K for the weight gradient (where the
    rows are the reduction)."""
    tile_m, _, tile_k = CONFIGS[config][:3]
    return tile_m if op == "rows" else tile_k


@functools.lru_cache(maxsize=None)
def _hopper(device: int) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def available(t: torch.Tensor) -> bool:
    """Built, and ``t`` lives on a Hopper GPU (asked on every expert GEMM: cached per device)."""
    return (t.is_cuda and t.dtype == torch.bfloat16 and _hopper(t.device.index)
            and bool(built_configs()))


def column_span(config: str) -> int:
    """The output columns one cluster of ``config`` covers: its tiles' columns times the
    cluster's; a GEMM whose columns are not a multiple computes its last cluster partly on
    zeros."""
    _, tile_n, _, _, cluster_n, _ = CONFIGS[config]
    return tile_n * cluster_n


def stored_column_major(w: torch.Tensor) -> bool | None:
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
    column_major = stored_column_major(b)
    return (b, column_major) if column_major is not None else (b.contiguous(), False)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride() == (t.size(1), 1) else t.contiguous()


def rows(a: torch.Tensor, b: torch.Tensor, row_ends: torch.Tensor, config: str,
         out: torch.Tensor | None = None, aligned: bool = False) -> torch.Tensor:
    """``out[rows_e] = a[rows_e] @ b[e]``, like ``torch._grouped_mm(a, b, offs=row_ends)``:
    ``a`` [n, K] bf16, ``b`` [E, K, N] in either orientation, ``row_ends`` int32 [E] on the
    device, ``out`` (optional) a contiguous [n, N] bf16 tensor to write. Rows past
    ``row_ends[-1]`` are left unwritten, as torch leaves them. ``aligned``: the tile-aligned
    instance; every entry of ``row_ends`` must then be a multiple of :func:`row_alignment`
    (read on the device, so not checked here)."""
    library = _load()
    b, column_major = _packed(b)
    experts, k, n = b.shape
    _check(config, k, n, aligned=aligned)
    a = _row_major(a)
    if out is None:
        out = torch.empty(a.size(0), n, device=a.device, dtype=a.dtype)
    elif out.shape != (a.size(0), n) or not out.is_contiguous() or out.dtype != a.dtype:
        raise ValueError(f"out must be a contiguous {a.dtype} [{a.size(0)}, {n}] tensor, "
                         f"got {out.dtype} {list(out.shape)}")
    kind = ("aligned_" if aligned else "") + ("col" if column_major else "row")
    _call(library, symbol(config, kind), a, b, out, row_ends, experts, n, k, aligned)
    return out


def wgrad(x: torch.Tensor, dy: torch.Tensor, row_ends: torch.Tensor, config: str,
          like: torch.Tensor, out: torch.Tensor | None = None,
          aligned: bool = False) -> torch.Tensor:
    """``dw[e] = x[rows_e]ᵀ @ dy[rows_e]`` (the weight gradient of :func:`rows`' forward):
    ``x`` [n, K], ``dy`` [n, N] bf16; the result (``out`` if given) has ``like``'s shape
    [E, K, N] and strides (``like`` stored [E, K, N] or [E, N, K]). An expert with no rows gets
    zeros. ``aligned`` as in :func:`rows`."""
    library = _load()
    experts, k, n = like.shape
    _check(config, k, n, aligned=aligned, wgrad=True)
    column_major = stored_column_major(like)
    if column_major is None:
        raise ValueError(f"weights must be packed [E, K, N] or [E, N, K], got strides "
                         f"{like.stride()}")
    if out is None:
        out = torch.empty_strided(like.shape, like.stride(), device=x.device, dtype=x.dtype)
    if out.shape != like.shape or out.stride() != like.stride() or out.dtype != x.dtype:
        raise ValueError("out must have like's shape, strides and x's dtype")
    x, dy = _row_major(x), _row_major(dy)
    name = symbol(config, "aligned_wgrad" if aligned else "wgrad")
    if column_major:  # stored [E, N, K]: dw[e]ᵀ = dyᵀ x
        _call(library, name, dy, x, out, row_ends, experts, n, k, aligned)
    else:  # stored [E, K, N]: dw[e] = xᵀ dy
        _call(library, name, x, dy, out, row_ends, experts, k, n, aligned)
    return out


def swiglu_dgrad(dout: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, probs: torch.Tensor,
                 row_ends: torch.Tensor, config: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fc2's input gradient ``d = dout[rows_e] @ w2[e]ᵀ`` taken straight through SwiGLU·prob's
    backward (:mod:`monta.swiglu`'s formulas) in the GEMM's epilogue: ``dout`` [n, H], ``w2``
    [E, F, H] contiguous, ``h`` [n, 2F] (fc1's output, ``[gate | up]``), ``probs`` [n] or
    [n, 1]. Returns (dh [n, 2F] bf16, dp [n] fp32); ``d`` itself is never written. Rows past
    ``row_ends[-1]`` are left unwritten in ``dh`` and zero in ``dp``."""
    experts, ffn, hidden = w2.shape
    _require_fused(SWIGLU_DGRAD_KIND, config)
    if ffn % 8 or hidden % 8:
        raise ValueError(f"sm90 grouped GEMM needs dims divisible by 8 (bf16), got {ffn}, {hidden}")
    n = dout.size(0)
    if h.shape != (n, 2 * ffn) or dout.shape != (n, hidden):
        raise ValueError(f"h must be [{n}, {2 * ffn}] and dout [{n}, {hidden}], got "
                         f"{list(h.shape)} and {list(dout.shape)}")
    w2, h, dout = w2.contiguous(), _row_major(h), _row_major(dout)
    dh = torch.empty_like(h)
    dp = torch.zeros(n, device=h.device, dtype=torch.float32)
    _run_fused(SWIGLU_DGRAD_KIND, config, (dout, w2, h, dh, _row_probs(probs, n), dp), row_ends,
               experts, ffn, hidden)
    return dh, dp


def swiglu_fc1(x: torch.Tensor, w1: torch.Tensor, probs: torch.Tensor, row_ends: torch.Tensor,
               config: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1's forward ``h = x[rows_e] @ w1[e]`` with ``y = silu(gate)·up·prob`` computed in its
    epilogue (monta/csrc/sm90_swiglu_fc1.cuh): ``x`` [n, H], ``w1`` [E, H, 2F] contiguous
    (megatron's ``[gate | up]`` columns), ``probs`` [n] or [n, 1]. Returns (h [n, 2F], y [n, F])
    bf16, ``h`` *paired*: each run of 2·P columns (P = :func:`paired_width`) holds P gate
    columns and then the P up columns of the same y columns (:func:`monta.swiglu.unpair`
    gives megatron's layout). Rows past ``row_ends[-1]`` are left unwritten."""
    experts, hidden, width = w1.shape
    ffn, half = width // 2, paired_width(config)
    _require_fused(SWIGLU_FC1_KIND, config)
    if ffn % half or hidden % 8 or width != 2 * ffn:
        raise ValueError(f"the fused fc1 of {config} needs F a multiple of {half} and H of 8, "
                         f"got w1 {list(w1.shape)}")
    n = x.size(0)
    if x.shape != (n, hidden):
        raise ValueError(f"x must be [n, {hidden}], got {list(x.shape)}")
    w1, x = w1.contiguous(), _row_major(x)
    h = torch.empty(n, width, device=x.device, dtype=x.dtype)
    y = torch.empty(n, ffn, device=x.device, dtype=x.dtype)
    if n:
        _run_fused(SWIGLU_FC1_KIND, config, (x, w1, h, y, _row_probs(probs, n)), row_ends,
                   experts, ffn, hidden)
    return h, y


def _row_probs(probs: torch.Tensor, rows: int) -> torch.Tensor:
    """The router probabilities as the fused kernels read them: fp32, one per row, packed."""
    return probs.reshape(rows).to(torch.float32).contiguous()


def _int32(row_ends: torch.Tensor) -> torch.Tensor:
    return row_ends if row_ends.dtype == torch.int32 else row_ends.to(torch.int32)


def _run_fused(kind: str, config: str, tensors: tuple, row_ends: torch.Tensor, experts: int,
               ffn: int, hidden: int) -> None:
    """``config``'s instance of the fused ``kind`` on ``tensors`` (in its C argument order),
    the row ends, and (groups, F, H); a RuntimeError naming it if it fails."""
    name = symbol(config, kind)
    first = tensors[0]
    status = _run_with_workspace(_load(), name, experts, first.device,
                                 *(t.data_ptr() for t in tensors), _int32(row_ends).data_ptr(),
                                 experts, ffn, hidden)
    if status:
        raise RuntimeError(f"MoNTA sm90 {FUSED_KINDS[kind][0]} {name} ({experts} groups, "
                           f"F {ffn}, H {hidden}, {first.size(0)} rows): "
                           f"{ERRORS.get(status, status)}")


def _require_fused(kind: str, config: str) -> None:
    if not fused_built(kind, config):
        raise ValueError(f"the sm90 library has no {FUSED_KINDS[kind][0]} instance of "
                         f"{config!r} (built: "
                         f"{', '.join(_fused_built.get(kind, ())) or 'none'})")


def _check(config: str, *dims: int, aligned: bool = False, wgrad: bool = False):
    if any(d % 8 for d in dims):  # 16-byte rows for TMA, as torch._grouped_mm requires too
        raise ValueError(f"sm90 grouped GEMM needs dims divisible by 8 (bf16), got {dims}")
    built = built_configs(aligned)
    if config not in built or (aligned and wgrad and not aligned_wgrad_built(config)):
        what = "tile-aligned instances of " if aligned else ""
        raise ValueError(f"sm90 grouped-GEMM {what}config {config!r} is not in the library "
                         f"(built: {', '.join(built) or 'none'}; tools/build_sm90_kernels.py)")


@functools.lru_cache(maxsize=None)
def _workspace_bytes(name: str, groups: int, device: int) -> int:
    """CUTLASS's argument arrays + workspace for ``groups`` groups: a function of the instance,
    the group count and the current device's SM count only, so asked once, not per GEMM."""
    return getattr(_load(), f"{name}_workspace")(groups)


def _run_with_workspace(library, name: str, groups: int, device, *args) -> int:
    """``name``'s status after running it with ``args``, then a workspace of the size it asks
    for and the current stream."""
    workspace = torch.empty(_workspace_bytes(name, groups, torch.cuda.current_device()),
                            device=device, dtype=torch.uint8)
    stream = torch.cuda.current_stream(device).cuda_stream
    return getattr(library, f"{name}_run")(*args, workspace.data_ptr(), workspace.numel(),
                                           stream)


def _call(library, name, a, b, out, row_ends, groups, dim0, dim1, aligned=False):
    pointers = (a.data_ptr(), b.data_ptr(), out.data_ptr(), _int32(row_ends).data_ptr())
    if aligned:  # the row capacity: a's rows (rows kind) or the reduction's (weight gradient)
        stream = torch.cuda.current_stream(a.device).cuda_stream
        status = getattr(library, f"{name}_run")(*pointers, groups, a.size(0), dim0, dim1,
                                                 BAND_M, stream)
    else:
        status = _run_with_workspace(library, name, groups, a.device, *pointers, groups, dim0,
                                     dim1)
    if status:
        raise RuntimeError(f"MoNTA sm90 grouped GEMM {name} ({groups} groups, dims {dim0}x{dim1},"
                           f" A {list(a.shape)}): {ERRORS.get(status, status)}")
