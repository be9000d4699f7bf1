"""Expert rows padded so that every expert's rows start at a multiple of the GEMM's row tile.

MoNTA's tile-aligned grouped GEMMs (``monta/csrc/sm90_aligned_gemm.cuh``) cover all experts with
one TMA descriptor per operand, which needs every expert's first row at a multiple of the
kernel's tile rows; a pointer-array grouped GEMM instead rewrites descriptors whenever a CTA
moves to another expert's tile (bench/gpu_batched_vs_grouped.py measures what that costs). The
GEMMs compute no more tiles than on unpadded rows (each expert's last tile is computed in full
either way), but the activations grow by up to E·(alignment − 1) rows and the elementwise
kernels between the GEMMs run over them, which is why padding is opt-in
(``MONTA_EXPERT_ROW_ALIGNMENT``, :func:`monta.expert_gemm.row_alignment`).

The pads are copies of token 0 with routing probability 0. The experts multiply their
activation by the probability (SwiGLU × p), so a pad's activation, its output and its share of
every weight and input gradient are exactly zero, and the combine, which reads only real rows
(``inverse``), never sees it. Shapes stay static, so nothing waits for the GPU: the rows are
sized for the worst case, n + E·(alignment − 1); the experts compute only up to the padded
ends (``tokens_per_expert.row_ends``), and rows past them are never read into a result.
"""

from __future__ import annotations

import dataclasses

import torch

from monta.dispatch.plan import ExpertOrder


def padded_capacity(rows: int, experts: int, alignment: int) -> int:
    """Rows the padded layout holds: enough for any split of ``rows`` over ``experts``."""
    return rows + experts * (alignment - 1)


def padded_positions(counts: torch.Tensor, alignment: int,
                     rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the rows of experts with ``counts`` [E] (grouped by expert) go when every
    expert's rows start at a multiple of ``alignment``: (positions [n] int64, padded ends [E]
    int32 with an ``alignment`` attribute: what the experts' GEMMs take). ``rows`` (n, if the
    caller knows it) saves a host sync on GPU counts."""
    counts = counts.long()
    padded = (counts + alignment - 1) // alignment * alignment
    padded_ends = torch.cumsum(padded, 0)
    shift = (padded_ends - padded) - (torch.cumsum(counts, 0) - counts)
    position = torch.repeat_interleave(shift, counts, output_size=rows)
    position += torch.arange(position.numel(), device=counts.device)
    ends = padded_ends.to(torch.int32)
    ends.alignment = alignment
    return position, ends


def pad_expert_order(order: ExpertOrder, probs: torch.Tensor,
                     alignment: int) -> tuple[ExpertOrder, torch.Tensor]:
    """``order`` (dropless top-k, with ``inverse``) and its probabilities [n] in expert order →
    the same with each expert's rows starting at a multiple of ``alignment``.

    ``tokens_per_expert`` keeps the real counts (statistics, megatron's bookkeeping); its
    ``row_ends`` attribute holds the padded ends (int32, ``alignment`` attribute set), which
    :mod:`monta.experts` hands to the GEMMs. ``probs`` stays differentiable.
    """
    if order.inverse is None:
        raise ValueError("padding needs an order with its inverse (order_by_expert_topk)")
    counts = order.tokens_per_expert
    n, experts = order.rows.numel(), counts.numel()
    if n == 0:
        return order, probs
    capacity = padded_capacity(n, experts, alignment)
    position, padded_ends = padded_positions(counts, alignment, rows=n)
    rows = order.rows.new_zeros(capacity).index_copy_(0, position, order.rows)
    experts_of_rows = order.experts.new_full((capacity,), -1).index_copy_(
        0, position, order.experts)
    padded_probs = probs.new_zeros(capacity).index_copy(0, position, probs)
    tokens_per_expert = counts.clone()
    tokens_per_expert.row_ends = padded_ends
    padded_order = dataclasses.replace(order, rows=rows, experts=experts_of_rows,
                                       tokens_per_expert=tokens_per_expert,
                                       inverse=position.index_select(0, order.inverse), flat=None)
    return padded_order, padded_probs
