"""The experts' GEMMs as one cuBLAS GEMM per expert, on row counts known to the host.

Transformer Engine's ``GroupedLinear`` works this way: the host splits the rows by expert and
launches a plain GEMM per expert. When each expert's GEMM is large, cuBLAS runs it at dense
speed, and that beats the grouped kernels (:mod:`monta.expert_gemm`). Those kernels take the
expert ends on the device, so they need no host sync, but they tile and schedule every expert
alike.

Measured on an H200 (``bench/gpu_moe.py``; the runs' JSON in ``bench/results/``), expert FFN
forward + backward, 8192 tokens, 4 calls back to back, interleaved:

* Mixtral shapes (8 experts, ~2048 rows each, a 240 GFLOP fc2 per expert): per-expert cuBLAS
  ran 3-4 % faster than the grouped default, its host sync included. The whole MoE layer, back
  to back, ran 27.6 instead of 29.4 ms (``gpu_moe_runs/gpu_moe_77a0c28.json``), 28.0 instead of
  29.4 ms at d68926f (``gpu_moe_runs/gpu_moe_d68926f.json``), 28.5 instead of 29.9 ms in the
  committed run (``gpu_moe.json``, 0993f04).
* Fine-grained shapes (64 experts, ~768 rows, 4.4 GFLOP per expert): it ran 2–3× slower. Each
  GEMM is then a few microseconds of work behind a launch.
* The 0.82 B training run (8 experts, 51 GFLOP per expert) lost with it: MFU 44.9 % with the
  GPU busy 90 % of the time (same JSON), against 48.6 % and 99 % on the grouped kernels in the
  runs before (``gpu_moe_runs/gpu_moe_8b43a16.json``). Its FFN gains too little per layer to
  pay for a sync in every layer's forward, which costs the host the lead it keeps over the GPU.

:func:`per_expert_passes` decides, per call, which passes run per expert. It reads
``MONTA_GROUPED_GEMM``:

* ``cublas``: forward and backward, always.
* unset (``default``): when the mean fc2 GEMM per local expert is at least
  :data:`MIN_EXPERT_GFLOP` (the rule uses the row count, which the host already knows, so the
  decision itself needs no sync). With the counts on the host (megatron's alltoall dispatcher)
  both passes run per expert. With the counts on the GPU (MoNTA's dispatcher) only the backward
  does: the forward runs on the grouped kernels, which read the row ends on the device, while
  the counts travel to the host; by the backward they are there, so no pass waits for the GPU
  to reach the router. (At Mixtral shapes the grouped forward GEMMs run within 0-4 % of dense,
  as fast as cuBLAS per expert; it is their weight gradient that trails, bench/results/
  gpu_moe.md.)
* any other pin names a grouped kernel: never.

The copy to the host starts (:func:`prefetch_host_counts`) as soon as the counts exist, in MoNTA's
dispatcher before it queues the permutation: under ``cublas`` the forward then waits for that
copy alone (an event), not for the permutation behind it, which the GPU still has to run while
the host launches the first expert GEMM.
"""

from __future__ import annotations

import torch

from monta import expert_gemm
from monta.expert_gemm import CUBLAS, DEFAULT, kernel_pin

# Per-expert GEMMs from this size up (2·rows/E·F·H FLOPs of fc2, the smaller projection),
# between the measured 51 GFLOP per expert (lost, in training) and 240 (won, in the layer).
MIN_EXPERT_GFLOP = 128.0


def per_expert_wanted(rows: int, w2_shape, pin: str) -> bool:
    """Whether ``rows`` routed rows through experts whose fc2 weight is ``w2_shape`` ``[E, F,
    H]`` run per expert under the ``MONTA_GROUPED_GEMM`` value ``pin`` (see module doc)."""
    if pin == CUBLAS:
        return True
    if pin != DEFAULT:
        return False
    experts, ffn, hidden = w2_shape
    return 2 * rows / experts * ffn * hidden / 1e9 >= MIN_EXPERT_GFLOP


BOTH = "both"  # forward and backward per expert
BACKWARD = "backward"  # forward on the grouped kernels, backward per expert


def per_expert_passes(x: torch.Tensor, w2: torch.Tensor, tokens_per_expert) -> str | None:
    """Which passes of the FFN of ``x [n, H]`` whose fc2 weight is ``w2 [E, F, H]`` run one
    GEMM per expert (module doc): :data:`BOTH`, :data:`BACKWARD` or None. Only on GPUs (CPU has
    its own loop) and not on padded rows (``tokens_per_expert.row_ends`` with an alignment:
    their layout is the grouped kernels'). Under :data:`BACKWARD` the counts' copy to the host
    has started (:func:`prefetch_host_counts`)."""
    pin = kernel_pin()
    if not x.is_cuda or not per_expert_wanted(x.size(0), w2.shape, pin):
        return None
    if getattr(getattr(tokens_per_expert, "row_ends", None), "alignment", None):
        return None
    counts_on_gpu = torch.is_tensor(tokens_per_expert) and tokens_per_expert.is_cuda
    if pin == CUBLAS or not counts_on_gpu:
        return BOTH
    prefetch_host_counts(tokens_per_expert, x.size(0), w2.shape)
    return BACKWARD


def host_splits(tokens_per_expert, rows: int, experts: int) -> list[int]:
    """The experts' row counts as host ints: from the copy :func:`prefetch_host_counts` started
    (waiting on its event), else read now (a sync if they are on the GPU); checked against the
    ``experts`` local experts and their ``rows`` rows."""
    prefetched = getattr(tokens_per_expert, "host_copy", None)
    if prefetched is not None:
        host, copied = prefetched
        copied.synchronize()
        splits = host.tolist()
    else:
        splits = torch.as_tensor(tokens_per_expert).tolist()
    if len(splits) != experts or sum(splits) != rows:
        raise ValueError(f"tokens_per_expert {splits} must give each of the {experts} "
                         f"local experts a count, summing to the {rows} rows")
    return splits


def prefetch_host_counts(tokens_per_expert: torch.Tensor, rows: int, w2_shape) -> None:
    """Start copying ``tokens_per_expert`` (on the GPU) to pinned host memory when ``rows``
    routed rows through experts whose fc2 weight is ``w2_shape`` will run per expert
    (:func:`per_expert_wanted`); :func:`host_splits` then waits on this copy's event only."""
    if (not tokens_per_expert.is_cuda or hasattr(tokens_per_expert, "host_copy")
            or not per_expert_wanted(rows, w2_shape, kernel_pin())):
        return
    host = torch.empty(tokens_per_expert.shape, dtype=tokens_per_expert.dtype, pin_memory=True)
    host.copy_(tokens_per_expert, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    tokens_per_expert.host_copy = (host, copied)


def _row_blocks(splits: list[int]):
    start = 0
    for expert, count in enumerate(splits):
        yield expert, start, start + count
        start += count


class PerExpertMM(torch.autograd.Function):
    """``out[rows_e] = x[rows_e] @ w[e]`` with one ``torch.mm`` per expert, each writing its
    block of rows in place (no concatenation); empty experts get zero weight gradients."""

    @staticmethod
    def forward(ctx, x, w, splits):
        out = x.new_empty(x.size(0), w.size(2))
        for expert, start, end in _row_blocks(splits):
            if end > start:
                torch.mm(x[start:end], w[expert], out=out[start:end])
        ctx.save_for_backward(x, w)
        ctx.splits = splits
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return (*_per_expert_grads(x, w, dy, ctx.splits, ctx.needs_input_grad), None)


def _per_expert_grads(x, w, dy, splits, needs_input_grad):
    """(dx, dw) of ``out[rows_e] = x[rows_e] @ w[e]``, one GEMM per expert writing its block in
    place; None where not needed; empty experts get zero weight gradients."""
    dy = dy.contiguous()
    dx = x.new_empty(x.shape) if needs_input_grad[0] else None
    dw = w.new_empty(w.shape) if needs_input_grad[1] else None
    for expert, start, end in _row_blocks(splits):
        if dx is not None and end > start:
            torch.mm(dy[start:end], w[expert].t(), out=dx[start:end])
        if dw is not None:
            if end > start:
                torch.mm(x[start:end].t(), dy[start:end], out=dw[expert])
            else:
                dw[expert].zero_()
    return dx, dw


class GroupedForwardPerExpertBackward(torch.autograd.Function):
    """``out[rows_e] = x[rows_e] @ w[e]``: the forward on the grouped kernels (the row ends on
    the device), the backward one GEMM per expert on the counts' host copy
    (:func:`prefetch_host_counts`), which arrived while the forward ran."""

    @staticmethod
    def forward(ctx, x, w, row_ends, tokens_per_expert):
        ctx.save_for_backward(x, w)
        ctx.tokens_per_expert = tokens_per_expert
        return expert_gemm.rows(x, w, row_ends)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        splits = host_splits(ctx.tokens_per_expert, x.size(0), w.size(0))
        return (*_per_expert_grads(x, w, dy, splits, ctx.needs_input_grad), None, None)


def per_expert_mm(x: torch.Tensor, w: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Differentiable ``x [n, K] @ w [E, K, N]`` by expert row blocks of sizes ``splits``."""
    return PerExpertMM.apply(x, w, splits)


def grouped_then_per_expert_mm(x: torch.Tensor, w: torch.Tensor, row_ends: torch.Tensor,
                               tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Differentiable ``x [n, K] @ w [E, K, N]`` by expert groups, forward grouped (``row_ends``
    int32 on the device), backward per expert (see :class:`GroupedForwardPerExpertBackward`)."""
    return GroupedForwardPerExpertBackward.apply(x, w, row_ends, tokens_per_expert)
