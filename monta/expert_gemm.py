"""The experts' grouped GEMMs, each on ``torch._grouped_mm`` or on one of MoNTA's kernels.

An expert projection ``out[rows_e] = x[rows_e] @ w[e]`` costs three grouped GEMMs per step:
the forward, the input gradient ``dy @ w[e]ᵀ`` and the weight gradient ``x[rows_e]ᵀ @ dy``.
Three implementations exist:

* ``torch._grouped_mm``: CUTLASS with one tile shape per problem class, 128×256 tiles in 2×1
  clusters at expert sizes, so each expert's rows are paid for in multiples of 256;
* MoNTA's CUTLASS library (:mod:`monta.sm90_gemm`, Hopper, built by
  ``tools/build_sm90_kernels.py``): the same collectives with other tile and cluster shapes;
* MoNTA's Triton kernels (:mod:`monta.grouped_gemm`, a few tile configs): within a few % of
  CUTLASS either way on an H200, never reliably faster (bench/results/gpu_grouped_gemm.json).

``MONTA_GROUPED_GEMM`` picks:

* unset (``default``): when the library is built and the GPU is a Hopper, the configs of
  :func:`default_configs` for the experts' mean rows (small experts: all three GEMMs on 128x128
  ping-pong kernels; large ones: the row GEMMs on 128x256 cooperative ones, the weight gradient
  on ``torch._grouped_mm``), otherwise ``torch._grouped_mm``;
* ``torch``: ``torch._grouped_mm`` for all three GEMMs;
* ``sm90:<config>[,<wgrad config>[,<input-gradient config>]]``: that config of
  :data:`monta.sm90_gemm.CONFIGS` for the row GEMMs, if given the second for the weight
  gradient (else ``torch._grouped_mm``) and the third for the input gradient (else the first).
  Each may list alternatives, ``<a>|<b>``: per GEMM the first whose column tiles, in whole
  clusters, cover its output's columns exactly (:func:`fitting_config`), else the first;
* ``auto``: like ``triton.autotune``, the first call of each GEMM shape times every candidate
  on its real inputs (round-robin), checks it against ``torch._grouped_mm``'s result, and keeps
  ``torch._grouped_mm`` unless a kernel beat it by ``TORCH_MARGIN``; later calls launch the
  choice straight away (no host sync). Shapes are keyed by the row count rounded up to a power
  of two, so an expert-parallel rank whose row count varies from step to step tunes a handful
  of times, not every step. Single calls time noisily (the same GEMM varies by 5-20 % between
  runs on the H200), so its picks can lose in the whole FFN;
* ``triton`` / ``sm90``: the fastest Triton / sm90 config, tuned the same way;
* ``cublas``: one cuBLAS GEMM per expert on host counts (:mod:`monta.per_expert_gemm`, which
  unset also picks for large experts); the grouped GEMMs that still run (padded rows) run as
  unset;
* ``grouped``: as unset, but never per expert, so the layer stays free of host syncs.
"""

from __future__ import annotations

import itertools
import logging
import os
import statistics

import torch

from monta import grouped_gemm, sm90_gemm
from monta.wgrad_overlap import WgradOverlap

logger = logging.getLogger(__name__)

TORCH = "torch"
SM90 = "sm90:"  # prefix of a monta.sm90_gemm config name
DEFAULT = "default"
CUBLAS = "cublas"  # per-expert GEMMs, monta/per_expert_gemm.py
GROUPED = "grouped"  # the default's grouped kernels, never per expert
# The default kernels when the sm90 library is built, (row GEMMs[, weight gradient[, input
# gradient]]; torch for a GEMM not named, the row config for an input gradient not named), by
# the experts' mean rows. Small experts: ping-pong on 128x128 tiles, each
# of the two consumer warpgroups owning a whole tile, so one tile's epilogue runs under the
# other's mainloop; the weight gradients' reduction is an expert's rows, ~768 at fine-grained
# shapes, 12 k-blocks, too few for a cooperative kernel to hide its epilogue behind. Large
# experts: 128x256 cooperative tiles for the rows, torch's kernel for the weight gradient.
# 1x2 clusters share each A tile between two column tiles, so rows are paid for in multiples
# of 128 in both. Interleaved A/Bs of the expert FFN fwd+bwd on an H200
# (bench/results/gpu_expert_kernels_runs/, bench/gpu_expert_kernels.py), back to back: at
# fine-grained shapes (768 rows per expert) 4.87-4.96 ms on the ping-pong pair with SwiGLU·prob
# unfused against 5.22-5.33 on the large-expert kernels (bench/gpu_moe.py: 86 % and 85 % of
# dense against 82 %); at Mixtral's (2048 rows per expert, on the grouped kernels) 27.99 vs
# 28.02 ms; the training run of bench/gpu_moe_train.py (8192 rows per expert) 625-629 against
# 620 ms per iteration.
# The small-expert input gradients: 176-wide tiles where they cover the output's columns and
# 128-wide ones do not (fc2's 1408 at fine-grained shapes: 8 tiles against 12 for 11 in 1x2
# clusters; its weights are K-major there, which 176 needs to keep the 128-byte swizzle). FFN
# back to back 4.84-4.85 against 4.89-4.97 ms (bench/results/gpu_expert_kernels_runs/
# ffn_fine_grained_128x176_*.json).
SM90_SMALL_EXPERT_CONFIGS = ("128x128_pp_c1x2", "128x128_pp_c1x2",
                             "128x128_pp_c1x2|128x176_pp_c1x2")
SM90_LARGE_EXPERT_CONFIGS = ("128x256_c1x2",)
# mean rows per expert up to which the small-expert configs run
SMALL_EXPERT_MAX_ROWS = 1024
# On rows padded per expert (monta/dispatch/padded_order.py) the row GEMMs run on the first
# config's tile-aligned instances and the weight gradient on the second's
# (monta/csrc/sm90_aligned_gemm.cuh): one TMA descriptor per operand for all experts instead of
# one per expert. 64-row tiles pad each expert by 32 rows on average, 128-row ones by 64.
SM90_ALIGNED_CONFIGS = ("64x256_pp_c1x1", "128x256_c1x1")
# Whether the dispatcher pads rows for them unless MONTA_EXPERT_ROW_ALIGNMENT says otherwise
# (see row_alignment). Off: single aligned GEMMs beat the pointer-array ones at fine-grained
# shapes (fc1 forward 562-571 vs 538-546 TFLOP/s), but in the whole expert FFN, fwd+bwd in
# interleaved rounds, padding lost: 5.21 ms (64-row tiles) and 5.41 ms (128-row) against the
# default's 5.00 ms, and 28.4 vs 28.4 ms at Mixtral shapes
# (bench/results/gpu_grouped_gemm_runs/ffn_aligned_1fb71b3.json).
PAD_ROWS_BY_DEFAULT = False
ALTERNATIVES = "|"  # separates a pin slot's configs, see fitting_config
ROW_OPS = ("rows", "dgrad")  # GEMMs by rows of the input: the forward and the input gradient
ROWS_CANDIDATES = (TORCH, (128, 256, 64, 3, 8), (128, 128, 64, 4, 4))
WGRAD_CANDIDATES = (TORCH, (128, 256, 64, 3, 8), (128, 128, 64, 3, 4))
TUNING_ROUNDS = 8
# torch._grouped_mm is kept unless a Triton kernel timed at least this much faster: the same
# kernel timed up to ~5 % apart between runs on the H200, and a pick inside that noise can
# lose (bench/gpu_grouped_gemm.py).
TORCH_MARGIN = 0.05
# A candidate whose result differs from torch._grouped_mm's by more than this (relative
# Frobenius norm; bf16 rounding differences are ~1e-3) is wrong, not just different.
MAX_REL_ERR = 2e-2

_chosen: dict = {}


def _sm90_config(candidate):
    """The sm90 config name a candidate names (``sm90:<config>``), else None."""
    if isinstance(candidate, str) and candidate.startswith(SM90):
        return candidate[len(SM90):]
    return None


def _rows_torch(a, b, row_ends):
    return torch._grouped_mm(a, b, offs=row_ends)


def _wgrad_torch(x, dy, row_ends, like):
    if like.stride(2) == 1:  # weight stored [E, K, N]
        return torch._grouped_mm(x.t(), dy, offs=row_ends)
    return torch._grouped_mm(dy.t(), x, offs=row_ends).transpose(1, 2)  # stored [E, N, K]


def _aligned(config, row_ends, op="rows") -> bool:
    """Whether ``config``'s tile-aligned instance of ``op`` can run on ``row_ends``: padded
    ends carry their ``alignment`` (monta/dispatch/padded_order.py), which the tile's rows (row
    GEMMs) or K (weight gradient) must divide."""
    alignment = getattr(row_ends, "alignment", None)
    if alignment is None or config not in sm90_gemm.built_configs(aligned=True):
        return False
    if op == "wgrad" and not sm90_gemm.aligned_wgrad_built(config):
        return False
    return alignment % sm90_gemm.row_alignment(config, op) == 0


def _run(op, candidate, args):
    config = _sm90_config(candidate)
    if op in ROW_OPS:
        a, b, row_ends = args
        if candidate == TORCH:
            return _rows_torch(a, b, row_ends)
        if config is not None:
            return sm90_gemm.rows(a, b, row_ends, config, aligned=_aligned(config, row_ends))
        return grouped_gemm.rows(a, b, row_ends, candidate)
    x, dy, row_ends, like = args
    if candidate == TORCH:
        return _wgrad_torch(x, dy, row_ends, like)
    if config is not None:
        return sm90_gemm.wgrad(x, dy, row_ends, config, like,
                               aligned=_aligned(config, row_ends, "wgrad"))
    out = torch.empty_strided(like.shape, like.stride(), device=like.device, dtype=like.dtype)
    return grouped_gemm.wgrad(x, dy, row_ends, out, candidate)


def _key(op, first, weight_like, rows, pinned, alignment=None):
    return (op, first.device.index, first.dtype, tuple(weight_like.shape),
            weight_like.stride(2) == 1, 1 << max(rows - 1, 0).bit_length(), alignment, pinned)


def fitting_config(slot: str, columns: int | None, is_built=None) -> str:
    """The config a pin's ``slot`` (``<a>[|<b>...]``) names for a GEMM whose output has
    ``columns`` columns: the first whose column tiles, in whole clusters, cover them exactly, so
    that no tile is computed on zeros (fc2's input gradient at fine-grained shapes: 1408
    columns are 11 tiles of 128, which a 1x2 cluster computes as 12, and 8 of 176), else the
    first. Alternatives the library lacks (``is_built``: default, its grouped GEMMs) are passed
    over while one of them is built."""
    built = _built_options(slot, is_built) or slot.split(ALTERNATIVES)
    for config in built:
        if columns is not None and config in sm90_gemm.CONFIGS \
                and columns % sm90_gemm.column_span(config) == 0:
            return config
    return built[0]


def _output_columns(op, args) -> int:
    """The columns of the matrix each expert's GEMM writes (the kernel's N)."""
    if op in ROW_OPS:
        return args[1].size(2)
    like = args[3]  # weight gradient: stored [E, K, N] it writes [K, N], stored [E, N, K] [N, K]
    return like.size(1) if sm90_gemm.stored_column_major(like) else like.size(2)


def _pinned_config(op, configs: list, columns: int | None = None) -> str | None:
    """The config of a pin's ``configs`` (``sm90:<rows>[,<wgrad>[,<input gradient>]]``) that
    ``op`` runs on, for an output of ``columns`` columns (:func:`fitting_config`); None for a
    weight gradient the pin leaves to torch."""
    if op == "wgrad":
        slot = configs[1] if len(configs) > 1 else None
    else:
        slot = configs[2] if op == "dgrad" and len(configs) > 2 else configs[0]
    return fitting_config(slot, columns) if slot else None


def _candidates(op, pinned, triton=True, sm90=False, columns=None):
    """What ``_tune`` times: torch, the Triton configs (if Triton is there) and the sm90
    library's built configs (if the GPU is a Hopper). A pin ``sm90:<rows>[,<wgrad>[,<input
    gradient>]]`` names the config of each GEMM (:func:`_pinned_config`)."""
    if _sm90_config(pinned) is not None:
        config = _pinned_config(op, _sm90_config(pinned).split(","), columns)
        usable = sm90 and config in sm90_gemm.built_configs()
        return (SM90 + config,) if usable else (TORCH,)
    candidates = ROWS_CANDIDATES if op in ROW_OPS else WGRAD_CANDIDATES
    if not triton:
        candidates = (TORCH,)
    if sm90:
        candidates += tuple(SM90 + config for config in sm90_gemm.built_configs())
    if pinned in ("triton", "sm90"):
        return tuple(c for c in candidates if c != TORCH
                     and (_sm90_config(c) is not None) == (pinned == "sm90")) or (TORCH,)
    return candidates


def _time_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _tune(op, key, args, triton=True, sm90=False):
    pinned = key[-1]
    columns = _output_columns(op, args) if _sm90_config(pinned) is not None else None
    candidates = _candidates(op, pinned, triton, sm90, columns)
    if len(candidates) == 1:
        return candidates[0]
    # the row GEMMs write rows up to the last end only (padded rows have a capacity past it)
    used = int(args[2][-1]) if op in ROW_OPS and args[2].numel() else None
    reference = _run(op, TORCH, args)[:used].float()
    scale = reference.norm().clamp_min(1e-12)
    usable = []
    for candidate in candidates:
        try:
            if candidate != TORCH:  # also compiles it
                err = ((_run(op, candidate, args)[:used].float() - reference).norm()
                       / scale).item()
                if not err <= MAX_REL_ERR:  # NaN too
                    logger.warning("grouped GEMM %s %s: result off by %.2e, not used", op,
                                   candidate, err)
                    continue
            usable.append(candidate)
        except Exception as error:  # e.g. a tile config this GPU's shared memory cannot hold
            logger.warning("grouped GEMM %s %s unavailable: %s: %s", op, candidate,
                           type(error).__name__, error)
    samples = {candidate: [] for candidate in usable}
    for _ in range(TUNING_ROUNDS):  # round-robin, so clock drift favours none of them
        for candidate in usable:
            samples[candidate].append(_time_ms(lambda: _run(op, candidate, args)))
    timed = {candidate: statistics.median(t) for candidate, t in samples.items()}
    if not timed:
        return TORCH
    best = min(timed, key=timed.get)
    if TORCH in timed and timed[best] > (1 - TORCH_MARGIN) * timed[TORCH]:
        best = TORCH
    logger.info("grouped GEMM %s %s: %s (%s)", op, key[3:6], best,
                ", ".join(f"{c}: {t:.3f} ms" for c, t in timed.items()))
    return best


def kernel_pin() -> str:
    """``MONTA_GROUPED_GEMM`` (see module doc); ``default`` when unset."""
    return os.environ.get("MONTA_GROUPED_GEMM", DEFAULT)


def default_configs(rows: int, experts: int) -> tuple:
    """The sm90 configs the default runs ``rows`` routed rows over ``experts`` on: (row GEMMs[,
    weight gradient]), see :data:`SMALL_EXPERT_MAX_ROWS`."""
    small = rows <= SMALL_EXPERT_MAX_ROWS * max(experts, 1)
    return SM90_SMALL_EXPERT_CONFIGS if small else SM90_LARGE_EXPERT_CONFIGS


def _pin(first, row_ends) -> str:
    pinned_kernel = kernel_pin()
    if pinned_kernel in (DEFAULT, CUBLAS, GROUPED):
        rows, wgrad = SM90_ALIGNED_CONFIGS
        if _aligned(rows, row_ends) and _aligned(wgrad, row_ends, "wgrad") \
                and sm90_gemm.available(first):
            return f"{SM90}{rows},{wgrad}"
        if not sm90_gemm.available(first):
            return TORCH
        slots = [_built_slot(slot) for slot in default_configs(first.size(0), row_ends.numel())]
        # a partial build: the slots up to the first one missing (each later one's place in
        # the pin names its GEMM), torch for all three without the row config
        built = list(itertools.takewhile(lambda slot: slot is not None, slots))
        return SM90 + ",".join(built) if built else TORCH
    return pinned_kernel


def _built_options(slot: str, is_built=None) -> list:
    """The configs of a pin ``slot`` (``<a>[|<b>...]``) that the library holds (``is_built``:
    default, its grouped GEMMs), in the slot's order."""
    is_built = is_built or (lambda config: config in sm90_gemm.built_configs())
    return [config for config in slot.split(ALTERNATIVES) if is_built(config)]


def _built_slot(slot: str) -> str | None:
    """A pin ``slot`` without the configs the library lacks; None if it holds none of them."""
    return ALTERNATIVES.join(_built_options(slot)) or None


def row_config(first: torch.Tensor, row_ends: torch.Tensor) -> str | None:
    """The sm90 config the row GEMMs on ``first`` grouped by ``row_ends`` run on, as
    ``MONTA_GROUPED_GEMM`` names it or defaults to (with its alternatives, if it lists any);
    None for torch and for tuned pins (they choose when they first run)."""
    config = _sm90_config(_pin(first, row_ends))
    config = config.split(",")[0] if config is not None else None
    return config if config is not None and _built_slot(config) == config else None


def row_alignment(t: torch.Tensor) -> int | None:
    """What MoNTA's dispatcher pads each expert's rows to for GEMMs on tensors like ``t``
    (monta/dispatch/padded_order.py), from ``MONTA_EXPERT_ROW_ALIGNMENT``: ``tile`` (the
    default when :data:`PAD_ROWS_BY_DEFAULT`) the row tile of the aligned kernels that
    ``MONTA_GROUPED_GEMM`` would run (:data:`SM90_ALIGNED_CONFIGS` by default, or a pinned sm90
    config's), None where they are not built or not a Hopper; ``0`` (the default otherwise)
    never; N > 0 to N anywhere (tests run the padded path on CPU so)."""
    asked = os.environ.get("MONTA_EXPERT_ROW_ALIGNMENT", "tile" if PAD_ROWS_BY_DEFAULT else "0")
    if asked != "tile":
        if not asked.isdigit():
            raise ValueError(f"MONTA_EXPERT_ROW_ALIGNMENT must be 'tile' or a row count >= 0, "
                             f"got {asked!r}")
        return int(asked) or None
    if not sm90_gemm.available(t):
        return None
    pinned = kernel_pin()
    config = SM90_ALIGNED_CONFIGS[0] if pinned in (DEFAULT, GROUPED) else _sm90_config(pinned)
    config = config.split(",")[0] if config else None
    if config not in sm90_gemm.built_configs(aligned=True):
        return None
    return sm90_gemm.row_alignment(config)


def _tuned(op, args, weight_like, rows):
    first = args[0]
    pinned = _pin(first, args[2])
    if pinned == TORCH or not first.is_cuda or rows == 0:
        return _run(op, TORCH, args)
    key = _key(op, first, weight_like, rows, pinned, getattr(args[2], "alignment", None))
    candidate = _chosen.get(key)
    if candidate is None:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA graph capture
            return _run(op, TORCH, args)
        candidate = _chosen[key] = _tune(op, key, args, grouped_gemm.available(first),
                                         sm90_gemm.available(first))
    return _run(op, candidate, args)


def choices() -> dict:
    """What tuning picked so far: {(op, device, dtype, weight shape, row-major, rows,
    row alignment, pin): kernel}; ``op`` is ``rows`` (forward), ``dgrad`` (input gradient) or
    ``wgrad``."""
    return dict(_chosen)


def rows(a: torch.Tensor, b: torch.Tensor, row_ends: torch.Tensor,
         input_gradient: bool = False) -> torch.Tensor:
    """``out[rows_e] = a[rows_e] @ b[e]`` (forward, or with ``input_gradient`` the input
    gradient ``dy @ w[e]ᵀ``) on the kernel chosen for it; not differentiable (:func:`grouped_mm`
    is)."""
    return _tuned("dgrad" if input_gradient else "rows", (a, b, row_ends), b, a.size(0))


def wgrad(x: torch.Tensor, dy: torch.Tensor, row_ends: torch.Tensor,
          like: torch.Tensor) -> torch.Tensor:
    """``dw[e] = x[rows_e]ᵀ @ dy[rows_e]`` with ``like``'s shape and strides, on the kernel
    chosen for it."""
    return _tuned("wgrad", (x, dy, row_ends, like), like, x.size(0))


def with_alignment(row_ends: torch.Tensor, alignment: int | None) -> torch.Tensor:
    """``row_ends`` carrying padded ends' ``alignment`` attribute (monta/dispatch/
    padded_order.py): itself when it already does or ``alignment`` is None, else a view with it
    set (autograd's saved tensors and copies to another device come back without it)."""
    if alignment is None or getattr(row_ends, "alignment", None) == alignment:
        return row_ends
    view = row_ends.view_as(row_ends)
    view.alignment = alignment
    return view


class GroupedMM(torch.autograd.Function):
    """``out[rows_e] = x[rows_e] @ w[e]``: forward, input and weight gradients each on the
    kernel tuned for it; ``w`` [E, K, N] may be a transposed view (its gradient keeps its
    strides)."""

    @staticmethod
    def forward(ctx, x, w, row_ends):
        ctx.save_for_backward(x, w, row_ends)
        ctx.alignment = getattr(row_ends, "alignment", None)
        return rows(x, w, row_ends)

    @staticmethod
    def backward(ctx, dy):
        x, w, row_ends = ctx.saved_tensors
        row_ends = with_alignment(row_ends, ctx.alignment)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = dw = None
        overlap = WgradOverlap(dy)
        if ctx.needs_input_grad[0]:
            dx = rows(dy, w.transpose(1, 2), row_ends, input_gradient=True)
        if ctx.needs_input_grad[1]:
            with overlap.side():
                dw = wgrad(x, dy, row_ends, w)
        overlap.join(dw)
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, row_ends: torch.Tensor) -> torch.Tensor:
    """Differentiable ``x [n, K] @ w [E, K, N]`` by expert groups (bf16 CUDA, see module doc)."""
    return GroupedMM.apply(x, w, row_ends)
