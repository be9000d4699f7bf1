"""Bytes on the wire: every collective of one layer's forward, per rank, per link class.

Legend (per rank, per MoE layer, per micro-batch): T tokens (the rank's sequence-parallel shard,
T = s·mbs/TP), h hidden, b bytes per element, k top-k, E experts, e = EP, t = TP, t_e = ETP.
Copies per token (``Copies``) come from :mod:`monta.planner.routing`. Each rank sends:

* ``alltoall`` (megatron stock): a2a T·h·b·(copies per (token, expert)) + probs (4 B/row);
  with t_e > 1 an all-gather of the T·k received rows to t_e − 1 peers, reduce-scatter back.
* ``monta`` flat: a2a T·h·b·(copies per (token, owner rank)) + routing columns E/e·(4 + b) B/row
  (fp32 probabilities and a 0/1 mask in the activation dtype, fused into the hidden-state message:
  a count exchange plus one all-to-all, plus one for the probabilities when b ≠ 4);
  node dedup: stage A T·h·b·(copies per (token, remote node)) with E/N columns per row, stage B
  the intra-node fan-out; then (t_e > 1) the all-gather of the T·ΣP_r rows at the owner.
* ``ds_tp``: all-gather of the TP group's tokens ((t − 1)·T rows + E·5 B of routing each), then
  monta flat on t·T tokens; combine all-reduces the rows over expert-TP when t_e = t > 1
  (ring: 2·(t_e − 1)/t_e of the rows).

Combine mirrors dispatch without the routing metadata; backward mirrors both (same bytes).
These are the quantities ``bench/dispatch_bytes.py`` counts (tests compare them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from monta.planner.layout import Layout
from monta.planner.routing import Copies

PROB_BYTES = 4  # router probabilities travel in fp32
MASK_BYTES = 1  # ds_tp's TP all-gather sends the routing mask as uint8
Mode = Literal["alltoall", "ds_tp", "monta_flat", "monta_dedup"]
MODES: tuple[Mode, ...] = ("alltoall", "ds_tp", "monta_flat", "monta_dedup")


@dataclass(frozen=True)
class Transfer:
    """One collective: bytes one rank sends off-rank, split by link class."""

    name: str
    """``tp_gather``, ``a2a`` (flat or stage A), ``fanout`` (stage B), ``etp_gather``,
    ``etp_reduce``, ``etp_allreduce``, ``a2a_back``, ``fanout_back``, ``sp_gather``, ..."""
    op: str
    """bench_comm op whose fit prices it: all_to_all, all_gather, reduce_scatter, all_reduce,
    p2p."""
    intra_bytes: float = 0.0
    """Payload (hidden states) to ranks on the same node."""
    inter_bytes: float = 0.0
    """Payload to ranks on other nodes."""
    intra_meta: float = 0.0
    """Routing metadata (probabilities, masks) to ranks on the same node."""
    inter_meta: float = 0.0
    """Routing metadata to ranks on other nodes."""
    calls: int = 1
    """Collectives issued (count exchange, hidden, probs, mask): one α each."""

    @property
    def intra_total(self) -> float:
        return self.intra_bytes + self.intra_meta

    @property
    def inter_total(self) -> float:
        return self.inter_bytes + self.inter_meta

    def scaled(self, factor: float) -> "Transfer":
        return Transfer(self.name, self.op, self.intra_bytes * factor, self.inter_bytes * factor,
                        self.intra_meta * factor, self.inter_meta * factor, self.calls)


@dataclass(frozen=True)
class MoEVolume:
    """One MoE layer's forward collectives on one rank (backward repeats them mirrored)."""

    mode: Mode
    dispatch: tuple[Transfer, ...]
    """In order; the first with inter-node bytes is the inter-node stage."""
    combine: tuple[Transfer, ...]
    expert_copies: float
    """(row, expert) pairs this rank's experts compute per micro-batch (FLOPs ∝ this)."""
    held_rows: float
    """Rows this rank stores for its experts (activation memory ∝ this)."""

    def totals(self) -> tuple[float, float]:
        """(intra, inter) bytes incl. metadata, dispatch + combine."""
        every = self.dispatch + self.combine
        return (sum(t.intra_total for t in every), sum(t.inter_total for t in every))


def moe_volume(mode: Mode, layout: Layout, copies: Copies, tokens: float, hidden: int,
               elem_bytes: int, num_experts: int, topk: int) -> MoEVolume:
    """The forward collectives of one MoE layer for dispatcher ``mode`` (module docstring).

    Args:
        tokens: T, this rank's tokens per micro-batch (its SP shard).
        elem_bytes: b, bytes per hidden-state element (2 bf16, 4 fp32).
    """
    if mode not in MODES:
        raise ValueError(f"unknown dispatcher mode {mode!r}; known: {MODES}")
    t, ep, etp = layout.tp, layout.ep, layout.etp
    row = hidden * elem_bytes
    # monta hops fuse probabilities and mask into the hidden-state message (monta/dispatch/hops)
    meta_col = PROB_BYTES + elem_bytes
    hop_calls = 2 if elem_bytes == PROB_BYTES else 3  # count exchange, message (, fp32 probs)
    owner_cols = (num_experts // ep) * meta_col
    dispatch, combine = [], []
    if mode == "alltoall":
        inter, intra = tokens * copies.alltoall_inter, tokens * copies.alltoall_intra
        a2a = Transfer("a2a", "all_to_all", intra * row, inter * row, intra * PROB_BYTES,
                       inter * PROB_BYTES, calls=3)
        at_owner = tokens * topk
        dispatch.append(a2a)
        if etp > 1:
            gathered = (etp - 1) * at_owner
            dispatch.append(Transfer("etp_gather", "all_gather", gathered * row, 0.0,
                                     gathered * PROB_BYTES, 0.0, calls=2))
            combine.append(Transfer("etp_reduce", "reduce_scatter", gathered * row, calls=1))
        combine.append(Transfer("a2a_back", "all_to_all", a2a.intra_bytes, a2a.inter_bytes))
        return MoEVolume(mode, tuple(dispatch), tuple(combine), at_owner * etp, at_owner * etp)

    if mode == "ds_tp":
        if etp not in (1, t):
            raise ValueError(f"ds_tp needs ETP 1 or ETP = TP, got TP{t} ETP{etp}")
        if t > 1:
            gathered = (t - 1) * tokens
            dispatch.append(Transfer("tp_gather", "all_gather", gathered * row, 0.0,
                                     gathered * num_experts * (PROB_BYTES + MASK_BYTES), 0.0,
                                     calls=3))
        sent = t * tokens  # every TP rank dispatches the TP group's tokens
        inter, intra = sent * copies.flat_inter, sent * copies.flat_intra
        a2a = Transfer("a2a", "all_to_all", intra * row, inter * row, intra * owner_cols,
                       inter * owner_cols, calls=hop_calls)
        dispatch.append(a2a)
        held = sent * copies.rows_at_owners
        if etp > 1:
            reduced = 2 * (etp - 1) / etp * held
            combine.append(Transfer("etp_allreduce", "all_reduce", reduced * row, calls=1))
        combine.append(Transfer("a2a_back", "all_to_all", a2a.intra_bytes, a2a.inter_bytes))
        return MoEVolume(mode, tuple(dispatch), tuple(combine), sent * topk, held)

    # monta: TP-sharded (each rank dispatches only its own T tokens)
    if mode == "monta_flat":
        inter, intra = tokens * copies.flat_inter, tokens * copies.flat_intra
        stage = Transfer("a2a", "all_to_all", intra * row, inter * row, intra * owner_cols,
                         inter * owner_cols, calls=hop_calls)
        dispatch.append(stage)
        back = [Transfer("a2a_back", "all_to_all", stage.intra_bytes, stage.inter_bytes)]
    else:
        nodes = max(1.0, copies.ep_nodes)
        node_cols = num_experts / nodes * meta_col
        inter, fan = tokens * copies.dedup_inter, tokens * copies.dedup_intra
        stage_a = Transfer("a2a", "all_to_all", 0.0, inter * row, 0.0, inter * node_cols,
                           calls=hop_calls)
        stage_b = Transfer("fanout", "all_to_all", fan * row, 0.0, fan * owner_cols, 0.0,
                           calls=hop_calls)
        dispatch += [stage_a, stage_b]
        back = [Transfer("fanout_back", "all_to_all", stage_b.intra_bytes),
                Transfer("a2a_back", "all_to_all", 0.0, stage_a.inter_bytes)]
    at_owner = tokens * copies.rows_at_owners
    if etp > 1:
        gathered = (etp - 1) * at_owner
        dispatch.append(Transfer("etp_gather", "all_gather", gathered * row, 0.0,
                                 gathered * owner_cols, 0.0, calls=hop_calls))
        combine.append(Transfer("etp_reduce", "reduce_scatter", gathered * row, calls=1))
    combine += back
    return MoEVolume(mode, tuple(dispatch), tuple(combine), tokens * topk * etp, at_owner * etp)


def sp_collectives(layout: Layout, tokens: float, hidden: int, elem_bytes: int,
                   ) -> tuple[Transfer, ...]:
    """Attention's sequence-parallel all-gather (before QKV) and reduce-scatter (after the
    output projection), forward: each sends (t − 1)·T·h·b inside the node. Backward mirrors."""
    if layout.tp == 1:
        return ()
    nbytes = (layout.tp - 1) * tokens * hidden * elem_bytes
    return (Transfer("sp_gather", "all_gather", nbytes), Transfer("sp_reduce", "reduce_scatter",
                                                                  nbytes))
