"""The expert FFN with SwiGLU × router probability fused into its grouped GEMMs (Hopper).

Unfused, the FFN makes two extra passes over its widest tensor, the ``[rows, 2F]`` output of
fc1 (~1 GB at Mixtral shapes): the activation's forward reads it to write ``y``, its backward
reads it again with fc2's input gradient to write ``dh`` (:mod:`monta.swiglu`, ~0.9 ms per
layer at Mixtral shapes on an H200, bench/results/gpu_moe.md). Here they move into GEMM
epilogues, where the operands are already in registers:

    fc1 forward       acc_g = x·W1[e][:, cols],  acc_u = x·W1[e][:, F + cols]
                      writes h = [acc_g | acc_u] (saved for backward) and y = silu(g)·u·p
    fc2 input grad    d = dout·W2[e]ᵀ for the same tile of y's columns, never written:
                      dh = [d·p·u·silu'(g) | d·p·silu(g)] and dp += Σ_cols d·silu(g)·u

Each program owns one ``BLOCK_M`` × ``BLOCK_N`` tile of ``y``'s columns and so holds the gate
and up halves of the same columns in two accumulators: megatron's ``[gate | up]`` weight
layout stays as it is (checkpoints unchanged). Rounding matches the unfused path: ``h`` and
``d`` are rounded to bf16 before the activation uses them.

``MONTA_FUSED_SWIGLU`` picks: ``fwd`` fuses fc1's forward only; ``all`` also fc2's input
gradient; ``bwd`` only the backward, in the epilogue of MoNTA's sm90 ping-pong kernel instead
of Triton's (opt-in, below); ``0`` neither; ``auto`` (default) ``fwd``, except ``0`` where the
row GEMMs run on MoNTA's small-expert sm90 kernels (128x128 ping-pong,
``monta.expert_gemm.SM90_SMALL_EXPERT_CONFIGS``) and that kernel's own fused fc1 cannot run.

On the small-expert kernels ``fwd`` runs the sm90 library's fc1 with the activation in its
epilogue (monta/csrc/sm90_swiglu_fc1.cuh, :func:`sm90_fc1_config`): the same CUTLASS ping-pong
kernel, whose column tile ``n`` reads W1's gate columns ``[64n, 64n + 64)`` and up columns
``[F + 64n, F + 64n + 64)`` (only the TMA boxes start elsewhere; the weights stay as megatron
stores them), so one tile holds both halves of 64 columns of ``y``. Its ``h`` is saved
*paired*, in runs of 64 gate then 64 up columns, and the activation's backward reads it so
(:mod:`monta.swiglu`). Triton's fused fc1 lost to the unfused ping-pong kernel there (the
fine-grained expert FFN fwd+bwd back to back 4.97 against 4.87-4.91 ms, one pass 5.26 against
5.09-5.10 ms, bench/results/gpu_expert_kernels_runs/ffn_fine_grained_unfused_*); the sm90 one
wins: 4.73 against 4.81 and 4.84 ms back to back, 4.86 against 4.98 and 5.00 ms one pass
(ffn_fine_grained_sm90_fc1_5936c08.json, same rounds). On the large-expert kernels
(128x256 cooperative) an sm90 build of it was no faster than Triton's fused fc1 or none
(ffn_large_sm90_fc1_5936c08.json), so Triton's runs there; ``MONTA_SM90_FUSED_FC1=0`` makes
Triton's run everywhere (to compare). Where the fused call fails unasked (e.g. Triton cannot
compile it for the GPU), :class:`monta.experts.MoNTAGroupedMLP` warns once and runs unfused.

Measured on an H200 (median ms, interleaved), the forward fusion is a wash. fc1 + activation
forward, fused vs unfused, back to back: 6.54 vs 6.27 ms (Mixtral), 1.30 vs 1.31 ms
(fine-grained); the FFN forward + backward 28.40 vs 28.37 and 5.47 vs 5.32 ms
(bench/results/gpu_swiglu_fusion_runs/gpu_swiglu_fusion_0a6ee58.json; the c260c15-era run of
the same script gave 6.57 vs 6.39, 1.17 vs 1.21, 28.09 vs 27.73 and 5.00 vs 5.04). MoNTA's
whole layer back to back at fine-grained shapes (bench/results/gpu_moe.md and gpu_moe_runs/):
5.61 vs 5.71 ms (0993f04), 5.53 vs 5.62 (0a6ee58); at Mixtral shapes the layer now runs per
expert on cuBLAS (monta/per_expert_gemm.py) and this fusion does not apply. The backward fusion
loses: fc2's input gradient + activation backward 4.36 vs 3.59 ms (Mixtral) and 1.06 vs 0.83 ms
(fine-grained), same JSON. Triton's input-gradient GEMM already trails CUTLASS's there, and,
not persistent, it cannot hide its epilogue's loads of ``h`` behind the next tile's main loop;
a persistent version of both kernels (the tile loop flattened with the K loop, Triton 3.6;
probed, not kept) was nowhere faster and up to 1.5× slower. Under ``all``, ``dp`` is summed
across column tiles with fp32 atomics, so its last bits depend on the order the tiles finish.

``bwd`` puts the activation's backward in the epilogue of CUTLASS's ping-pong kernel
(monta/csrc/sm90_swiglu_dgrad.cuh; fc1's forward and the activation's forward as under ``0``).
fc2's input gradient + the activation's backward at the fine-grained shapes: 0.705 ms against
0.790 ms unfused and 0.988 ms under ``all`` (bench/results/gpu_swiglu_fusion.json, b583af2);
at Mixtral shapes 3.54 against 3.56 ms. The expert FFN is no faster back to back: 4.857 vs
4.869 ms there, 4.89 vs 4.96 ms in bench/gpu_expert_kernels.py's rounds
(bench/results/gpu_expert_kernels_runs/ffn_fine_grained_bwd_b583af2.json), 4.92 vs 4.89 ms in
an earlier run of the same kernel; one pass at a time 4.97 vs 5.08 ms. Unfused, the
activation's backward runs beside fc2's weight gradient on the side stream
(monta/wgrad_overlap.py), so what the fusion takes off the critical path was mostly hidden
already. Hence opt-in. Its ``dp`` is summed with fp32 atomics too, and its sigmoid comes from
the hardware's tanh (~2^-11 relative error, below the bf16 outputs'): the gradients differ from
the unfused ones by ~3e-4 relative.

The other GEMMs run on whatever :mod:`monta.expert_gemm` picks. Tiles are located from the
device row ends as in :mod:`monta.grouped_gemm`, so the layer stays free of host syncs.
"""

from __future__ import annotations

import os

import torch

from monta import expert_gemm, grouped_gemm, sm90_gemm, swiglu
from monta.wgrad_overlap import WgradOverlap

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the unfused path runs
    triton = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). fc1's BLOCK_N columns of y are 2·BLOCK_N
# GEMM columns (gate and up), so 128 here is the work of a 128×256 tile.
FC1_CONFIG = (128, 128, 64, 4, 8)
DGRAD_CONFIG = (128, 128, 64, 4, 8)
GROUP_M = grouped_gemm.GROUP_M

if grouped_gemm.TensorDescriptor is not None:
    _locate_tile = grouped_gemm._locate_tile

    @triton.jit
    def _tile_of(pid, row_ends_ptr, F, E: tl.constexpr, E_POW2: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Expert, first row, end row and first column of y for program ``pid`` (GROUP_M row
        tiles sweep the columns together, so they share W[e]'s slab in L2)."""
        per_group = GROUP_M * tl.cdiv(F, BLOCK_N)
        m_tile = (pid // per_group) * GROUP_M + (pid % per_group) % GROUP_M
        n0 = ((pid % per_group) // GROUP_M) * BLOCK_N
        expert, row0, row_end = _locate_tile(row_ends_ptr, m_tile, E, E_POW2, BLOCK_M)
        return expert, row0, row_end, n0

    @triton.jit
    def _fc1_swiglu_kernel(x_desc, w_desc, h_ptr, y_ptr, p_ptr, row_ends_ptr, F, K,
                           E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
        # w_desc: W1 as [E·K, 2F] row-major storage; K % BLOCK_K == 0, so a K block never
        # reaches the next expert. A gate block past F reads up columns and an up block past
        # 2F reads zeros: both land only in columns the stores mask off.
        expert, row0, row_end, n0 = _tile_of(tl.program_id(0), row_ends_ptr, F, E, E_POW2,
                                             BLOCK_M, BLOCK_N, GROUP_M)
        if expert < E:
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a = x_desc.load([row0, k])
                acc_g = tl.dot(a, w_desc.load([expert * K + k, n0]), acc_g)
                acc_u = tl.dot(a, w_desc.load([expert * K + k, F + n0]), acc_u)
            rows = row0 + tl.arange(0, BLOCK_M)
            cols = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < row_end
            mask = row_ok[:, None] & (cols < F)[None, :]
            out_ty = h_ptr.dtype.element_ty
            gate, up = acc_g.to(out_ty), acc_u.to(out_ty)
            h_rows = h_ptr + rows.to(tl.int64)[:, None] * (2 * F) + cols[None, :]
            tl.store(h_rows, gate, mask=mask)
            tl.store(h_rows + F, up, mask=mask)
            g = gate.to(tl.float32)
            prob = tl.load(p_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            y = g * tl.sigmoid(g) * up.to(tl.float32) * prob[:, None]
            tl.store(y_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :], y.to(out_ty),
                     mask=mask)

    @triton.jit
    def _fc2_dgrad_swiglu_kernel(dout_desc, w_desc, h_ptr, p_ptr, dh_ptr, dp_ptr, row_ends_ptr,
                                 F, K, E: tl.constexpr, E_POW2: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # w_desc: W2 as [E·F, K] row-major storage (W2[e] is [F, K=H]); its block of rows n0..
        # may run into the next expert's rows past F: those columns are masked off below.
        expert, row0, row_end, n0 = _tile_of(tl.program_id(0), row_ends_ptr, F, E, E_POW2,
                                             BLOCK_M, BLOCK_N, GROUP_M)
        if expert < E:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                acc = tl.dot(dout_desc.load([row0, k]),
                             tl.trans(w_desc.load([expert * F + n0, k])), acc)
            rows = row0 + tl.arange(0, BLOCK_M)
            cols = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < row_end
            mask = row_ok[:, None] & (cols < F)[None, :]
            out_ty = dh_ptr.dtype.element_ty
            d = acc.to(out_ty).to(tl.float32)
            offsets = rows.to(tl.int64)[:, None] * (2 * F) + cols[None, :]
            g = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(h_ptr + offsets + F, mask=mask, other=0.0).to(tl.float32)
            prob = tl.load(p_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            sig = tl.sigmoid(g)
            silu = g * sig
            tl.store(dh_ptr + offsets, (d * prob * u * sig * (1.0 + g * (1.0 - sig))).to(out_ty),
                     mask=mask)
            tl.store(dh_ptr + offsets + F, (d * prob * silu).to(out_ty), mask=mask)
            tl.atomic_add(dp_ptr + rows, tl.sum(tl.where(mask, d * silu * u, 0.0), axis=1),
                          mask=row_ok)


def _grid(rows: int, experts: int, ffn: int, config) -> tuple[int]:
    """Enough programs for the worst case: ceil(rows / BM) + E row tiles (each expert may end
    in a partial one), in whole GROUP_M groups, times y's column tiles."""
    block_m, block_n = config[:2]
    max_tiles = triton.cdiv(rows, block_m) + experts
    return (triton.cdiv(max_tiles, GROUP_M) * GROUP_M * triton.cdiv(ffn, block_n),)


def sm90_dgrad_config(ffn: int) -> str | None:
    """The sm90 instance that runs fc2's input gradient with the activation's backward
    (``bwd``) for ``ffn`` columns: of those built, the first whose column tiles fit them
    (:func:`monta.expert_gemm.fitting_config`); None when none is built."""
    if not any(map(sm90_gemm.swiglu_dgrad_built, sm90_gemm.SWIGLU_DGRAD_CONFIGS)):
        return None
    return expert_gemm.fitting_config(expert_gemm.ALTERNATIVES.join(
        sm90_gemm.SWIGLU_DGRAD_CONFIGS), ffn, sm90_gemm.swiglu_dgrad_built)


def sm90_fc1_config(x: torch.Tensor, w1: torch.Tensor,
                    row_ends: torch.Tensor | None) -> str | None:
    """The sm90 instance that runs fc1's forward with the activation (``fwd``) on ``x``
    grouped by ``row_ends``: the config the row GEMMs run on
    (:func:`monta.expert_gemm.row_config`) when the library holds its fused fc1
    (monta/csrc/sm90_swiglu_fc1.cuh) and F is a multiple of its paired width; else None, and
    this module's Triton kernel runs ``fwd``. ``MONTA_SM90_FUSED_FC1=0`` says None always
    (Triton's fused fc1 then runs, e.g. to compare the two)."""
    if row_ends is None or not _sm90_fc1_allowed() or not sm90_gemm.available(x) \
            or w1.dtype != torch.bfloat16:
        return None
    config = expert_gemm.row_config(x, row_ends)
    if config is None or not sm90_gemm.swiglu_fc1_built(config):
        return None
    hidden, width = w1.shape[1:]
    return config if (width // 2) % sm90_gemm.paired_width(config) == 0 and hidden % 8 == 0 \
        and w1.is_contiguous() and x.size(1) == hidden else None


SM90_FC1_VARIABLE = "MONTA_SM90_FUSED_FC1"  # "0": Triton's fused fc1 even where the sm90 one runs


def _sm90_fc1_allowed() -> bool:
    return os.environ.get(SM90_FC1_VARIABLE, "1") != "0"


def supported(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, passes: str = "fwd",
              row_ends: torch.Tensor | None = None) -> bool:
    """Whether ``passes`` (``fwd`` or ``all``: this module's Triton kernels, for ``fwd`` the
    sm90 library's where :func:`sm90_fc1_config` names one for ``row_ends``; ``bwd``: the sm90
    library's, monta/csrc/sm90_swiglu_dgrad.cuh) run ``x [n, H]`` through ``w1 [E, H, 2F]`` and
    ``w2 [E, F, H]`` here. Triton: TMA descriptors on a Hopper or newer GPU (the configs' shared
    memory and the measurements are Hopper's), H a multiple of the K block. Both: bf16, both
    weights contiguous (how ``GroupedMLP`` views its parameters), 16-byte aligned rows."""
    if passes == "fwd" and sm90_fc1_config(x, w1, row_ends) is not None:
        return swiglu.available(x) and w2.dtype == torch.bfloat16 and w2.is_contiguous() \
            and w1.size(2) == 2 * w2.size(1) and w2.size(2) == x.size(1)
    if passes == "bwd":
        return (sm90_gemm.available(x) and sm90_dgrad_config(w2.size(1)) is not None
                and swiglu.available(x) and {w1.dtype, w2.dtype} == {torch.bfloat16}
                and w1.is_contiguous() and w2.is_contiguous() and w2.size(1) % 8 == 0
                and w2.size(2) % 8 == 0 and w1.size(2) == 2 * w2.size(1))
    if grouped_gemm.TensorDescriptor is None or not x.is_cuda:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if {x.dtype, w1.dtype, w2.dtype} != {torch.bfloat16}:
        return False
    if not (w1.is_contiguous() and w2.is_contiguous()):
        return False
    hidden, ffn = w1.size(1), w2.size(1)
    return (w1.size(2) == 2 * ffn and w2.size(2) == hidden and x.size(1) == hidden
            and hidden % max(FC1_CONFIG[2], DGRAD_CONFIG[2]) == 0 and ffn % 8 == 0
            and grouped_gemm._tma_ready(x))


FUSE_VARIABLE = "MONTA_FUSED_SWIGLU"
FUSE_CHOICES = ("auto", "fwd", "all", "bwd", "0")


def fused_passes(x: torch.Tensor | None = None, row_ends: torch.Tensor | None = None,
                 w1: torch.Tensor | None = None) -> str:
    """``MONTA_FUSED_SWIGLU`` (see module doc) for the expert FFN of input ``x`` grouped by
    ``row_ends`` (and fc1's weights ``w1``, if given): ``fwd``, ``all``, ``bwd`` or ``0``;
    ``auto`` (the default) is ``fwd``, except ``0`` where the row GEMMs run on MoNTA's
    small-expert sm90 kernels and its fused fc1 does not (not built, or F off its paired runs):
    that kernel's unfused fc1 beats this module's fused one."""
    asked = os.environ.get(FUSE_VARIABLE, "auto")
    if asked not in FUSE_CHOICES:
        raise ValueError(f"{FUSE_VARIABLE} must be one of {', '.join(FUSE_CHOICES)}, "
                         f"got {asked!r}")
    if asked == "auto":
        small = expert_gemm.SM90_SMALL_EXPERT_CONFIGS[0]
        if x is None or row_ends is None or expert_gemm.row_config(x, row_ends) != small:
            return "fwd"
        fused_fc1 = (_sm90_fc1_allowed() and sm90_gemm.swiglu_fc1_built(small) if w1 is None
                     else sm90_fc1_config(x, w1, row_ends) is not None)
        return "fwd" if fused_fc1 else "0"
    return asked


def fusion_asked() -> bool:
    """Whether the user set ``MONTA_FUSED_SWIGLU`` (then a failing fused call is an error)."""
    return FUSE_VARIABLE in os.environ


def _launch(kernel, a, weight_2d, weight_block, experts, ffn, config, *pointers):
    """``kernel`` over ``a``'s rows: TMA descriptors for ``a`` and the weight's 2-D storage,
    the worst-case grid over y's columns, the shared constants."""
    block_m, block_n, block_k, stages, warps = config
    a_desc = grouped_gemm.TensorDescriptor.from_tensor(a, [block_m, block_k])
    w_desc = grouped_gemm.TensorDescriptor.from_tensor(weight_2d, weight_block)
    kernel[_grid(a.size(0), experts, ffn, config)](
        a_desc, w_desc, *pointers, ffn, a.size(1), E=experts,
        E_POW2=triton.next_power_of_2(experts), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=GROUP_M, num_stages=stages, num_warps=warps)


def fc1_swiglu(x, w1, probs, row_ends, config=FC1_CONFIG):
    """(h [n, 2F], y [n, F]): ``h`` = fc1's output per expert, ``y = silu(gate)·up·prob``."""
    experts, hidden, width = w1.shape
    h = torch.empty(x.size(0), width, device=x.device, dtype=x.dtype)
    y = torch.empty(x.size(0), width // 2, device=x.device, dtype=x.dtype)
    if x.size(0):
        _launch(_fc1_swiglu_kernel, x, w1.view(experts * hidden, width), [config[2], config[1]],
                experts, width // 2, config, h, y, probs, row_ends)
    return h, y


def fc2_dgrad_swiglu(dout, w2, h, probs, row_ends, config=DGRAD_CONFIG):
    """(dh [n, 2F], dp [n] fp32): the gradients of fc1's output and of the probabilities,
    from fc2's output gradient ``dout`` [n, H] (see module doc)."""
    experts, ffn, hidden = w2.shape
    dh = torch.empty_like(h)
    dp = torch.zeros(dout.size(0), device=dout.device, dtype=torch.float32)
    if dout.size(0):
        _launch(_fc2_dgrad_swiglu_kernel, dout, w2.view(experts * ffn, hidden),
                [config[1], config[2]], experts, ffn, config, h, probs, dh, dp, row_ends)
    return dh, dp


class SwiGLUExpertFFN(torch.autograd.Function):
    """``out = fc2(silu(gate)·up·prob)`` with ``[gate | up] = fc1(x)``, per expert group:
    x [n, H], w1 [E, H, 2F], w2 [E, F, H], probs [n, 1], row_ends int32 [E] on the device;
    ``passes`` (``MONTA_FUSED_SWIGLU``): ``fwd`` the activation in fc1's forward epilogue,
    ``all`` also its backward in fc2's input gradient (both Triton), ``bwd`` only the backward,
    in the epilogue of MoNTA's sm90 kernel. ``fwd`` runs on the sm90 library's fc1 where
    :func:`sm90_fc1_config` names one (its ``h`` paired, which the backward reads as such)."""

    @staticmethod
    def forward(ctx, x, w1, w2, probs, row_ends, passes):
        probs = probs.contiguous()
        ctx.paired = 0  # h in megatron's layout, or paired in runs of this many columns
        sm90_config = sm90_fc1_config(x, w1, row_ends) if passes == "fwd" else None
        if passes == "bwd":
            h = expert_gemm.rows(x, w1, row_ends)
            y = swiglu.weighted_swiglu_forward(h, probs)
        elif sm90_config is not None:
            h, y = sm90_gemm.swiglu_fc1(x, w1, probs, row_ends, sm90_config)
            ctx.paired = sm90_gemm.paired_width(sm90_config)
        else:
            h, y = fc1_swiglu(x, w1, probs, row_ends)
        ctx.save_for_backward(x, w1, w2, probs, row_ends, h, y)
        ctx.alignment = getattr(row_ends, "alignment", None)
        ctx.passes = passes
        return expert_gemm.rows(y, w2, row_ends)

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, probs, row_ends, h, y = ctx.saved_tensors
        row_ends = expert_gemm.with_alignment(row_ends, ctx.alignment)
        dout = dout.contiguous()
        overlap = WgradOverlap(dout)
        dw1 = dw2 = None
        if ctx.needs_input_grad[2]:
            with overlap.side():
                dw2 = expert_gemm.wgrad(y, dout, row_ends, w2)
        if ctx.passes == "all":
            dh, dp = fc2_dgrad_swiglu(dout, w2, h, probs, row_ends)
        elif ctx.passes == "bwd":
            dh, dp = sm90_gemm.swiglu_dgrad(dout, w2, h, probs, row_ends,
                                            sm90_dgrad_config(w2.size(1)))
        else:
            dy = expert_gemm.rows(dout, w2.transpose(1, 2), row_ends, input_gradient=True)
            dh, dp = swiglu.weighted_swiglu_backward(h, probs, dy, paired=ctx.paired)
        overlap.fork()  # fc1's weight gradient reads dh
        if ctx.needs_input_grad[1]:
            with overlap.side():
                dw1 = expert_gemm.wgrad(x, dh, row_ends, w1)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = expert_gemm.rows(dh, w1.transpose(1, 2), row_ends, input_gradient=True)
        overlap.join(dw1, dw2)
        return dx, dw1, dw2, dp.view_as(probs).to(probs.dtype), None, None


def swiglu_expert_ffn(x, w1, w2, probs, row_ends, passes: str = "fwd"):
    if passes not in ("fwd", "all", "bwd"):
        raise ValueError(f"passes must be fwd, all or bwd, got {passes!r}")
    return SwiGLUExpertFFN.apply(x, w1, w2, probs, row_ends, passes)
