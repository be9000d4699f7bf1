"""The MoNTA token dispatcher: topology-aware, TP-sharded, node-deduplicated.

Shapes: H hidden, T tokens on this rank (its sequence-parallel shard), E experts, R = EP size.

Dispatch, per MoE layer (each stage switchable, see :class:`DispatchOptions`)::

    tokens [T, H] ──(ds_tp only: all-gather over TP)──►
      stage A  all-to-all over EP: node_dedup → one copy per (token, remote node) to a gateway
                                   flat       → one copy per (token, owner rank)
      stage B  node_dedup only: all-to-all inside the node, gateway → the other owners
      ETP      all-gather over expert-TP (intra-node): sharded experts see every token
    rows [n, H] ──► sorted by local expert ──► megatron's experts module

Combine mirrors it: the experts' outputs are already weighted by their router probabilities
(megatron's experts apply ``permuted_probs``), so every hop back is a plain sum: per row over
local experts, reduce-scatter over ETP, sum at the gateway over its node's owners (so a token
crosses back once per node), then at the source over nodes. Autograd differentiates the
composition (all-to-all ↔ all-to-all, all-gather ↔ reduce-scatter, gather ↔ scatter-add).

The ``ds_tp`` baseline is the same class with ``tp_shard=False, node_dedup=False``: every TP
rank dispatches all TP·T tokens, as DeepSpeed-MoE did, then keeps its own shard of the output.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from monta import comm, expert_gemm, per_expert_gemm
from monta.dispatch import hops
from monta.dispatch.autotune import CHUNK_OPTIONS, DispatchTuner
from monta.dispatch.counted_alltoall import CountedAlltoAllTokenDispatcher
from monta.dispatch.padded_order import pad_expert_order
from monta.dispatch.permute import ExpandToExperts, GatherFlat, SumFromExperts
from monta.dispatch.plan import (
    ExpertLayout,
    ExpertOrder,
    SendPlan,
    order_by_expert_topk,
    order_by_local_expert,
    plan_to_gateways,
    plan_to_owners,
)
from monta.dispatch.stats import timed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatchOptions:
    """The dispatcher's switchable stages (flags ``--monta-*``)."""

    tp_shard: bool = True
    """Each TP rank dispatches only its sequence-parallel shard (False: the ``ds_tp`` baseline)."""
    node_dedup: Literal["on", "off", "auto", "tune"] = "auto"
    """One copy per (token, remote node) plus an intra-node fan-out; ``auto`` applies the
    static rule in :func:`node_dedup_pays`, ``tune`` measures both (:mod:`.autotune`)."""

    chunks: int | Literal["tune"] = 1
    """Split each layer's tokens into this many chunks and pipeline them (inter-node all-to-all
    of chunk i+1 overlapping the intra-node phases and experts of chunk i), forward and
    backward; see :mod:`monta.dispatch.pipelined`. ``tune`` measures 1/2/4/8."""

    def __post_init__(self):
        if self.chunks != "tune" and not (isinstance(self.chunks, int) and self.chunks >= 1):
            raise ValueError(f"--monta-chunks must be an int >= 1 or 'tune', got {self.chunks!r}")
        if self.node_dedup not in ("on", "off", "auto", "tune"):
            raise ValueError(f"node_dedup must be on/off/auto/tune, got {self.node_dedup!r}")

    @staticmethod
    def from_config(config) -> "DispatchOptions":
        return getattr(config, "monta_dispatch", None) or DispatchOptions()


def node_dedup_pays(topk: int, num_nodes: int) -> bool:
    """Uniform routing sends k copies flat but only u = N·(1 − (1 − 1/N)^k) with dedup; the
    extra intra-node hop costs roughly one more pass over the rows, so require k/u ≥ 1.5."""
    if num_nodes < 2 or topk < 2:
        return False
    distinct_nodes = num_nodes * (1 - (1 - 1 / num_nodes) ** topk)
    return topk / distinct_nodes >= 1.5


def _or_stock(method):
    """Hand the call to megatron's dispatcher while the tuner tries, or has picked, ``stock``."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.stock is not None and self.tuner.setting().stock:
            return getattr(self.stock, method.__name__)(*args, **kwargs)
        return method(self, *args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class _Stage:
    """One all-to-all hop: what was sent from which local row and how much came back."""

    plan: SendPlan
    recv_splits: list[int]

    @property
    def num_kept(self) -> int:
        return self.plan.kept_rows.numel()


class MoNTATokenDispatcher(MoETokenDispatcher):
    """megatron-core ``MoETokenDispatcher`` with MoNTA's topology-aware dispatch."""

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection):
        super().__init__(config=config, pg_collection=pg_collection)
        from monta.parallel import get_topology

        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.attn_tp_group = pg_collection.tp
        self.attn_tp_size = comm.group_size(self.attn_tp_group)
        self.options = DispatchOptions.from_config(config)
        self.topology = get_topology()
        ep_ranks = (dist.get_process_group_ranks(self.ep_group) if self.ep_size > 1
                    else [dist.get_rank() if dist.is_initialized() else 0])
        self.layout = ExpertLayout.contiguous(
            config.num_moe_experts, [self.topology.node(r) for r in ep_ranks],
            ep_ranks.index(dist.get_rank() if dist.is_initialized() else 0))
        # One rank holds every expert whole (EP = ETP = 1): nothing crosses ranks, so no send
        # plans or count exchanges; dropless, the expert ordering has a size the host knows
        # (tokens · top-k), so the whole layer runs without a host sync (order_by_expert_topk).
        self.local_only = self.ep_size == 1 and self.tp_size == 1
        tuning = "tune" in (self.options.node_dedup, self.options.chunks)
        # megatron's own path is a tuning candidate: cheaper where there is nothing to save
        self.stock = (CountedAlltoAllTokenDispatcher(num_local_experts, local_expert_indices,
                                                     config=config, pg_collection=pg_collection)
                      if tuning and self.options.tp_shard and not self.local_only else None)
        self.tuner = DispatchTuner.for_options(self._dedup_options(config.moe_router_topk),
                                               self._chunk_options(), group=self.tp_ep_group,
                                               with_stock=self.stock is not None)
        self.static_order = self.local_only and config.moe_expert_capacity_factor is None
        # the router may hand over that order itself, instead of a [T, E] routing map
        # (monta/router.py); the pipelined forward (chunks > 1) slices the map, so not there
        self.takes_expert_order = self.static_order and self.options.chunks == 1
        if not self.options.tp_shard and self.tp_size not in (1, self.attn_tp_size):
            raise ValueError(f"ds_tp dispatch needs expert-TP size 1 or equal to TP "
                             f"({self.attn_tp_size}), got {self.tp_size}")
        self.layer_number = None
        # whether the experts take rows padded per expert (set by MoNTAMoELayer for
        # MoNTAGroupedMLP; monta/dispatch/padded_order.py)
        self.pad_expert_rows = False

    @property
    def layer_number(self):
        return self._layer_number

    @layer_number.setter
    def layer_number(self, number):
        # the stock fallback tags its bytes and times with the same layer
        self._layer_number = number
        if self.stock is not None:
            self.stock.layer_number = number

    # -- options --------------------------------------------------------------------------
    def _dedup_options(self, topk: int) -> list[bool]:
        mode = self.options.node_dedup
        if mode == "tune":
            return [False, True] if self.layout.num_nodes > 1 and topk > 1 else [False]
        if mode == "auto":
            return [node_dedup_pays(topk, self.layout.num_nodes)]
        return [mode == "on"]

    def _chunk_options(self) -> list[int]:
        return list(CHUNK_OPTIONS) if self.options.chunks == "tune" else [self.options.chunks]

    @property
    def node_dedup(self) -> bool:
        """Whether this forward de-duplicates per node (fixed, or the tuner's current pick)."""
        return self.tuner.setting().node_dedup

    @property
    def chunks(self) -> int:
        return self.tuner.setting().chunks

    # -- bookkeeping ----------------------------------------------------------------------
    def _tag(self, phase: str) -> str:
        return f"layer{self.layer_number or 0}/{phase}"

    def _send(self, stage: _Stage, x, probs, phase):
        """Rows of ``x``/``probs`` per ``stage.plan``, across the EP group; returns received."""
        return hops.finish_send(hops.start_send(stage.plan, stage.recv_splits, x, probs,
                                                group=self.ep_group, topology=self.topology,
                                                tag=self._tag(phase)), x, probs)

    def _stage(self, plan: SendPlan, device) -> _Stage:
        return _Stage(plan, comm.exchange_counts([plan.splits], group=self.ep_group,
                                                 device=device)[0])

    # -- dispatch -------------------------------------------------------------------------
    @_or_stock
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_shape[-1])  # [T, H]
        self.num_local_tokens = x.size(0)
        if not self.options.tp_shard and self.attn_tp_size > 1:
            # ds_tp: every TP rank holds (and will send) all TP·T tokens of its TP group
            sizes = [x.size(0)] * self.attn_tp_size
            x = comm.all_gather_v(x, sizes, group=self.attn_tp_group, topology=self.topology,
                                  tag=self._tag("tp_gather"))
            probs = comm.all_gather_v(probs, sizes, group=self.attn_tp_group,
                                      topology=self.topology, tag=self._tag("tp_gather/meta"))
            routing_map = comm.all_gather_v(routing_map.to(torch.uint8), sizes,
                                            group=self.attn_tp_group, topology=self.topology,
                                            tag=self._tag("tp_gather/meta")).bool()
        self.routing_map = routing_map
        return x, probs

    @_or_stock
    @timed("dispatch")
    def token_dispatch(self, x, probs):
        if self.local_only:
            self.stage_a = self.stage_b = self.etp_sizes = None
            self.rows_mask = self.routing_map
            return x, probs
        device = x.device
        if self.node_dedup:
            self.stage_a = self._stage(plan_to_gateways(self.routing_map, self.layout), device)
            held_x, held_probs, held_mask = self._send(self.stage_a, x, probs, "dispatch/inter")
            self.stage_b = self._stage(
                plan_to_owners(held_mask, self.layout, only_node=self.layout.my_node), device)
            rows = self._send(self.stage_b, held_x, held_probs, "dispatch/intra")
            self.num_held = held_x.size(0)
        else:
            self.stage_a = self._stage(plan_to_owners(self.routing_map, self.layout), device)
            self.stage_b = None
            rows = self._send(self.stage_a, x, probs, "dispatch/flat")
        rows_x, rows_probs, rows_mask = rows
        self.etp_sizes = None
        if self.options.tp_shard and self.tp_size > 1:
            # sharded experts need every token routed to this EP rank from all ETP peers
            self.etp_sizes = comm.gather_counts(rows_x.size(0), group=self.tp_group, device=device)
            rows_x, rows_probs, rows_mask = hops.finish_etp_gather(hops.start_etp_gather(
                rows_x, rows_probs, rows_mask, self.local_expert_indices, self.etp_sizes,
                group=self.tp_group, topology=self.topology, tag=self._tag("dispatch/etp_gather")),
                self.config.num_moe_experts)
        self.rows_mask = rows_mask
        return rows_x, rows_probs

    @_or_stock
    @timed("dispatch")
    def dispatch_postprocess(self, rows_x, rows_probs):
        self.num_rows = rows_x.size(0)
        if isinstance(self.rows_mask, ExpertOrder):
            # MoNTA's router ordered the tokens itself, probabilities included (router.py)
            self.order = order = self.rows_mask
            permuted_probs = rows_probs
        elif self.static_order:
            self.order = order = order_by_expert_topk(self.rows_mask, self.config.moe_router_topk)
            permuted_probs = GatherFlat.apply(rows_probs, order.flat)
        else:
            self.order = order = order_by_local_expert(self.rows_mask, self.local_expert_indices)
            permuted_probs = rows_probs[order.rows, order.experts]
        self._prefetch_counts(order)
        if order.inverse is not None:  # gathers both ways instead of scatters (permute.py)
            alignment = expert_gemm.row_alignment(rows_x) if self.pad_expert_rows else None
            if alignment and alignment > 1:
                order, permuted_probs = pad_expert_order(order, permuted_probs, alignment)
                self.order = order
            permuted = ExpandToExperts.apply(rows_x, order.rows, order.inverse, order.topk)
        else:
            permuted = rows_x[order.rows]
        return permuted, order.tokens_per_expert, permuted_probs

    def _prefetch_counts(self, order: ExpertOrder) -> None:
        """Start the counts' copy to the host now, before the permutation is queued, where the
        experts will run one GEMM per expert (monta/per_expert_gemm.py)."""
        ffn = (self.config.moe_ffn_hidden_size or self.config.ffn_hidden_size) // self.tp_size
        per_expert_gemm.prefetch_host_counts(order.tokens_per_expert, order.rows.numel(),
                                             (self.num_local_experts, ffn, self.config.hidden_size))

    # -- combine --------------------------------------------------------------------------
    @_or_stock
    @timed("combine")
    def combine_preprocess(self, expert_output):
        order = self.order
        if order.inverse is not None:
            return SumFromExperts.apply(expert_output, order.rows, order.inverse, order.topk)
        rows_out = expert_output.new_zeros(self.num_rows, expert_output.size(-1))
        rows_out = rows_out.index_add(0, self.order.rows, expert_output)
        if self.etp_sizes is not None:
            rows_out = comm.reduce_scatter_v(rows_out, self.etp_sizes, group=self.tp_group,
                                             topology=self.topology,
                                             tag=self._tag("combine/etp_reduce"))
        elif not self.options.tp_shard and self.tp_size > 1:
            # ds_tp: every expert-TP rank saw the same rows; sum their partial outputs
            rows_out = comm.all_reduce_sum(rows_out, group=self.tp_group, topology=self.topology,
                                           tag=self._tag("combine/etp_allreduce"))
        return rows_out

    def _return(self, stage: _Stage, rows_out, num_dest_rows, phase):
        """Inverse of :meth:`_send`: sum each row's outputs back into the rows it came from."""
        return hops.finish_return(hops.start_return(
            stage.plan, stage.recv_splits, rows_out, group=self.ep_group,
            topology=self.topology, tag=self._tag(phase)), num_dest_rows)

    @_or_stock
    @timed("combine")
    def token_combine(self, rows_out):
        if self.local_only:
            return rows_out
        num_tokens = self.routing_map.size(0)
        if self.stage_b is not None:
            held_out = self._return(self.stage_b, rows_out, self.num_held, "combine/intra")
            return self._return(self.stage_a, held_out, num_tokens, "combine/inter")
        return self._return(self.stage_a, rows_out, num_tokens, "combine/flat")

    @_or_stock
    def combine_postprocess(self, tokens_out):
        if not self.options.tp_shard and self.attn_tp_size > 1:
            rank = self.attn_tp_group.rank()
            tokens_out = tokens_out[rank * self.num_local_tokens:(rank + 1) * self.num_local_tokens]
        return tokens_out.view(self.hidden_shape)


class DSTPTokenDispatcher(MoNTATokenDispatcher):
    """The DeepSpeed-MoE-style baseline: no TP sharding, no node dedup (the paper's 8×)."""

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection):
        config = copy.copy(config)
        config.monta_dispatch = DispatchOptions(tp_shard=False, node_dedup="off", chunks=1)
        super().__init__(num_local_experts, local_expert_indices, config, pg_collection)
