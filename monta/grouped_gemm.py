"""Grouped GEMM for the experts as Triton kernels (CUDA), next to ``torch._grouped_mm``.

Rows of ``x`` are grouped by expert (``row_ends[e]`` = end row of expert ``e``, int32 on the
device, so nothing waits for the host). Two kernels, each with pointer loads and with Hopper
TMA loads, cover an expert projection's forward and backward:

    rows   (forward, input gradient)  out[rows_e] = a[rows_e] @ b[e]      b [E, K, N], any strides
    wgrad  (weight gradient)          dw[e] = x[rows_e]ᵀ @ dy[rows_e]     dw in any strides

Why next to ``torch._grouped_mm``: its Hopper kernel has one tile shape per problem class
(128×256 in 2×1 clusters at expert-FFN sizes), and an expert with a row count just past a
multiple of 256 costs as much as the next multiple (bench/results/gpu_grouped_gemm.json,
``uniform_rows_fc1_fwd``). Here the tile shape is a parameter and nothing is rounded, and a
kernel of our own is where an epilogue (SwiGLU·prob) could be fused. Measured on an H200 they
ran within a few % of CUTLASS, faster on some GEMMs and slower on others, so
:mod:`monta.expert_gemm` uses them only when asked to tune. The schedule is static: the grid is
sized for the worst case, ``ceil(n / BM) + E`` row tiles, and each program finds its expert
from ``row_ends`` (one vector load and a cumsum over E); programs past the last tile exit. No
host sync, so the layer stays sync-free.

Correctness does not depend on rows past an expert's end: a row of the output depends only on
the same row of ``a``, and stores are masked to the expert's rows; the weight-gradient kernel
masks rows outside the expert in its loads.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use torch._grouped_mm or a loop
    triton = None
try:  # Hopper TMA descriptors (Triton >= 3.4); the pointer kernels work without them
    from triton.tools.ragged_tma import create_ragged_descriptor, load_ragged
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def available(t: torch.Tensor) -> bool:
    import os

    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
ROWS_CONFIG = (128, 256, 64, 3, 8)
WGRAD_CONFIG = (128, 256, 64, 3, 8)
GROUP_M = 8  # row tiles that sweep the columns together (L2 reuse of b[e])

if triton is not None:

    @triton.jit
    def _locate_tile(row_ends_ptr, m_tile, E: tl.constexpr, E_POW2: tl.constexpr,
                     BLOCK_M: tl.constexpr):
        """Expert, first row and end row of global row tile ``m_tile`` (expert == E: none).

        Tiles are numbered expert by expert, ceil(rows_e / BLOCK_M) per expert; empty experts
        own none."""
        idx = tl.arange(0, E_POW2)
        ends = tl.load(row_ends_ptr + idx, mask=idx < E, other=0)
        starts = tl.load(row_ends_ptr + idx - 1, mask=(idx > 0) & (idx < E), other=0)
        tiles = tl.where(idx < E, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        tile_ends = tl.cumsum(tiles, 0)
        # Padding lanes hold the total: counted only when m_tile is past every tile.
        tile_ends = tl.where(idx < E, tile_ends, tl.sum(tiles, 0))
        expert = tl.sum((tile_ends <= m_tile).to(tl.int32), 0)
        mine = idx == expert
        first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)
        row_start = tl.sum(tl.where(mine, starts, 0), 0)
        row_end = tl.sum(tl.where(mine, ends, 0), 0)
        return expert, row_start + (m_tile - first_tile) * BLOCK_M, row_end

    @triton.jit
    def _rows_kernel(a_ptr, b_ptr, c_ptr, row_ends_ptr, N, K,
                     stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm,
                     E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        # GROUP_M row tiles sweep the columns together, so a wave of programs shares a slab
        # of b[e] in L2 instead of streaming all of it once per row tile.
        per_group = GROUP_M * num_n
        group = pid // per_group
        m_tile = group * GROUP_M + (pid % per_group) % GROUP_M
        n_tile = (pid % per_group) // GROUP_M
        expert, row0, row_end = _locate_tile(row_ends_ptr, m_tile, E, E_POW2, BLOCK_M)
        if expert < E:
            rows = row0 + tl.arange(0, BLOCK_M)
            cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            ks = tl.arange(0, BLOCK_K)
            row_ok = rows < row_end
            a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
            b_cols = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :] * stride_bn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a = tl.load(a_rows + (k + ks)[None, :] * stride_ak,
                            mask=row_ok[:, None] & ((k + ks) < K)[None, :], other=0.0)
                b = tl.load(b_cols + (k + ks)[:, None] * stride_bk,
                            mask=((k + ks) < K)[:, None] & (cols < N)[None, :], other=0.0)
                acc = tl.dot(a, b, acc)
            out = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
            tl.store(out, acc.to(c_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < N)[None, :])

    @triton.jit
    def _wgrad_kernel(x_ptr, dy_ptr, dw_ptr, row_ends_ptr, K, N,
                      stride_xm, stride_xk, stride_dym, stride_dyn,
                      stride_we, stride_wk, stride_wn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        expert = tl.program_id(1)
        num_n = tl.cdiv(N, BLOCK_N)
        ks = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        ns = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(row_ends_ptr + expert - 1, mask=expert > 0, other=0)
        end = tl.load(row_ends_ptr + expert)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in range(start, end, BLOCK_R):
            rows = r + tl.arange(0, BLOCK_R)
            ok = rows < end
            xt = tl.load(x_ptr + rows.to(tl.int64)[None, :] * stride_xm + ks[:, None] * stride_xk,
                         mask=ok[None, :] & (ks < K)[:, None], other=0.0)
            g = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + ns[None, :] * stride_dyn,
                        mask=ok[:, None] & (ns < N)[None, :], other=0.0)
            acc = tl.dot(xt, g, acc)
        out = (dw_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk
               + ns[None, :] * stride_wn)
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=(ks < K)[:, None] & (ns < N)[None, :])


if TensorDescriptor is not None:

    @triton.jit
    def _rows_tma_kernel(a_desc, b_desc, c_ptr, stride_cm, row_ends_ptr, N, K,
                         E: tl.constexpr, E_POW2: tl.constexpr, B_NK: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
        # b_desc is b as 2-D storage: [E·K, N] ("KN": b[e] row-major) or [E·N, K] ("NK":
        # b[e]ᵀ row-major); K % BLOCK_K == 0, so a K block never reaches the next expert.
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        m_tile = (pid // per_group) * GROUP_M + (pid % per_group) % GROUP_M
        n0 = ((pid % per_group) // GROUP_M) * BLOCK_N
        expert, row0, row_end = _locate_tile(row_ends_ptr, m_tile, E, E_POW2, BLOCK_M)
        if expert < E:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a = a_desc.load([row0, k])
                if B_NK:
                    b = tl.trans(b_desc.load([expert * N + n0, k]))
                else:
                    b = b_desc.load([expert * K + k, n0])
                acc = tl.dot(a, b, acc)
            rows = row0 + tl.arange(0, BLOCK_M)
            cols = n0 + tl.arange(0, BLOCK_N)
            out = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
            tl.store(out, acc.to(c_ptr.dtype.element_ty),
                     mask=(rows < row_end)[:, None] & (cols < N)[None, :])

    @triton.jit
    def _wgrad_tma_kernel(x_desc, dy_desc, dw_ptr, row_ends_ptr, K, N,
                          stride_we, stride_wk, stride_wn, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        expert = tl.program_id(1)
        num_n = tl.cdiv(N, BLOCK_N)
        k0 = (pid // num_n) * BLOCK_M
        n0 = (pid % num_n) * BLOCK_N
        start = tl.load(row_ends_ptr + expert - 1, mask=expert > 0, other=0)
        count = tl.load(row_ends_ptr + expert) - start
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in range(0, count, BLOCK_R):  # rows outside the expert load as zeros
            xt = tl.trans(load_ragged(x_desc, start, count, [r, k0]))
            g = load_ragged(dy_desc, start, count, [r, n0])
            acc = tl.dot(xt, g, acc)
        ks = k0 + tl.arange(0, BLOCK_M)
        ns = n0 + tl.arange(0, BLOCK_N)
        out = (dw_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk
               + ns[None, :] * stride_wn)
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=(ks < K)[:, None] & (ns < N)[None, :])


def _storage_2d(b: torch.Tensor):
    """b [E, K, N] as 2-D row-major storage and whether it is b[e]ᵀ ("NK") or b[e] ("KN")."""
    experts, k, n = b.shape
    if b.stride(2) == 1 and b.stride(1) == n and b.stride(0) == k * n:
        return b.reshape(experts * k, n), False
    if b.stride(1) == 1 and b.stride(2) == k and b.stride(0) == k * n:
        return b.transpose(1, 2).reshape(experts * n, k), True
    return None, None


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """TMA descriptors can cover these 2-D CUDA tensors: unit last stride, 16-byte aligned base
    and row stride."""
    return TensorDescriptor is not None and all(
        t.is_cuda and t.stride(1) == 1 and t.data_ptr() % 16 == 0
        and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def tma_supported(a: torch.Tensor, b: torch.Tensor, config=None) -> bool:
    block_k = (config or ROWS_CONFIG)[2]
    storage, _ = _storage_2d(b)
    return storage is not None and b.size(1) % block_k == 0 and _tma_ready(a, storage)


def _rows_output_and_grid(a, b, config):
    """The [n, N] output and the static grid: enough programs for the worst case, ceil(n / BM)
    + E row tiles (each expert may end in a partial one), in whole GROUP_M groups, times the
    column tiles."""
    experts, _, cols = b.shape
    out = torch.empty(a.size(0), cols, device=a.device, dtype=a.dtype)
    max_tiles = triton.cdiv(a.size(0), config[0]) + experts
    return out, (triton.cdiv(max_tiles, GROUP_M) * GROUP_M * triton.cdiv(cols, config[1]),)


def rows_mm_tma(a, b, row_ends, config=ROWS_CONFIG):
    """:func:`rows_mm` with TMA loads (see :func:`tma_supported`)."""
    out, grid = _rows_output_and_grid(a, b, config)
    if a.size(0) == 0:
        return out
    block_m, block_n, block_k, stages, warps = config
    storage, nk = _storage_2d(b)
    a_desc = TensorDescriptor.from_tensor(a, [block_m, block_k])
    b_desc = TensorDescriptor.from_tensor(storage, [block_n, block_k] if nk else [block_k, block_n])
    experts = b.size(0)
    _rows_tma_kernel[grid](a_desc, b_desc, out, out.stride(0), row_ends, b.size(2), a.size(1),
                           E=experts, E_POW2=triton.next_power_of_2(experts), B_NK=nk,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
                           num_stages=stages, num_warps=warps)
    return out


def wgrad_mm_tma(x, dy, row_ends, out, config=WGRAD_CONFIG):
    experts, k, cols = out.shape
    block_m, block_n, block_r, stages, warps = config
    x_desc = create_ragged_descriptor(x, [block_r, block_m])
    dy_desc = create_ragged_descriptor(dy, [block_r, block_n])
    grid = (triton.cdiv(k, block_m) * triton.cdiv(cols, block_n), experts)
    _wgrad_tma_kernel[grid](x_desc, dy_desc, out, row_ends, k, cols, out.stride(0),
                            out.stride(1), out.stride(2), BLOCK_M=block_m, BLOCK_N=block_n,
                            BLOCK_R=block_r, num_stages=stages, num_warps=warps)
    return out


def rows_mm(a: torch.Tensor, b: torch.Tensor, row_ends: torch.Tensor,
            config=ROWS_CONFIG) -> torch.Tensor:
    """``out[rows_e] = a[rows_e] @ b[e]``; a [n, K] (unit column stride), b [E, K, N] (any
    strides), row_ends int32 [E] on the device. Returns [n, N] in ``a``'s dtype."""
    out, grid = _rows_output_and_grid(a, b, config)
    if a.size(0) == 0:
        return out
    block_m, block_n, block_k, stages, warps = config
    experts = b.size(0)
    _rows_kernel[grid](a, b, out, row_ends, b.size(2), a.size(1), a.stride(0), a.stride(1),
                       b.stride(0), b.stride(1), b.stride(2), out.stride(0), E=experts,
                       E_POW2=triton.next_power_of_2(experts), BLOCK_M=block_m, BLOCK_N=block_n,
                       BLOCK_K=block_k, GROUP_M=GROUP_M, num_stages=stages, num_warps=warps)
    return out


def wgrad_mm(x: torch.Tensor, dy: torch.Tensor, row_ends: torch.Tensor,
             out: torch.Tensor, config=WGRAD_CONFIG) -> torch.Tensor:
    """``out[e] = x[rows_e]ᵀ @ dy[rows_e]`` into ``out`` [E, K, N] (any strides, e.g. a
    transposed view of a weight stored [E, N, K]); experts without rows get zeros."""
    experts, k, cols = out.shape
    block_m, block_n, block_r, stages, warps = config
    grid = (triton.cdiv(k, block_m) * triton.cdiv(cols, block_n), experts)
    _wgrad_kernel[grid](x, dy, out, row_ends, k, cols, x.stride(0), x.stride(1), dy.stride(0),
                        dy.stride(1), out.stride(0), out.stride(1), out.stride(2),
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
                        num_stages=stages, num_warps=warps)
    return out


def rows(a, b, row_ends, config=ROWS_CONFIG):
    """:func:`rows_mm_tma` where TMA applies, else :func:`rows_mm`."""
    if tma_supported(a, b, config):
        return rows_mm_tma(a, b, row_ends, config)
    return rows_mm(a, b, row_ends, config)


def wgrad(x, dy, row_ends, out, config=WGRAD_CONFIG):
    """:func:`wgrad_mm_tma` where TMA applies, else :func:`wgrad_mm`."""
    if _tma_ready(x, dy):
        return wgrad_mm_tma(x, dy, row_ends, out, config)
    return wgrad_mm(x, dy, row_ends, out, config)

