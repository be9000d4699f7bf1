"""Chunked, pipelined MoE forward for the MoNTA dispatcher (``--monta-chunks C``).

The layer's tokens are cut into C chunks; each chunk runs the whole MoE path, and the chunks are
software-pipelined so chunk i+1's inter-node all-to-all is in flight while chunk i crosses the
intra-node phases and the experts (stages of ``comm.chunked_pipeline``)::

    chunk 0:  A→ | wait A, B→ | wait B, ETP→ | wait, experts, RS→ | wait, B← | wait, A← | sum
    chunk 1:       A→         | wait A, B→   | ...

Backward is pipelined too, by construction: every hop is a start and a wait autograd node
(:mod:`monta.dispatch.hops`), so the gradients' collectives overlap the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from monta import comm
from monta.dispatch import hops
from monta.dispatch.plan import ExpertOrder, SendPlan, order_by_local_expert, plan_to_gateways, \
    plan_to_owners


@dataclass
class _Chunk:
    """Everything one chunk carries between stages (its own plans; tensors with autograd)."""

    tokens: torch.Tensor
    plan_a: SendPlan | None = None
    recv_a: list[int] = field(default_factory=list)
    plan_b: SendPlan | None = None
    recv_b: list[int] = field(default_factory=list)
    etp_sizes: list[int] | None = None
    order: ExpertOrder | None = None
    pending: Any = ()
    held: tuple = ()
    num_rows: int = 0


class PipelinedMoE:
    """Runs one MoE layer's dispatch → experts → combine over C pipelined chunks."""

    def __init__(self, dispatcher, experts, num_chunks: int):
        self.d, self.experts, self.num_chunks = dispatcher, experts, num_chunks

    # each stage returns (chunk, None): waits happen inside the next stage as autograd nodes
    def _ep(self, phase: str) -> dict:
        d = self.d
        return dict(group=d.ep_group, topology=d.topology, tag=d._tag(phase))

    def stage_dispatch_a(self, i, chunk: _Chunk):
        x, probs = chunk.tokens
        phase = "dispatch/inter" if self.d.node_dedup else "dispatch/flat"
        chunk.pending = hops.start_send(chunk.plan_a, chunk.recv_a, x, probs, **self._ep(phase))
        return chunk, None

    def stage_dispatch_b(self, i, chunk: _Chunk):
        d = self.d
        chunk.held = hops.finish_send(chunk.pending, *chunk.tokens)
        if not d.node_dedup:
            chunk.pending = ()
            return chunk, None
        x, probs, mask = chunk.held
        chunk.plan_b = plan_to_owners(mask, d.layout, only_node=d.layout.my_node)
        chunk.recv_b = comm.exchange_counts([chunk.plan_b.splits], group=d.ep_group,
                                            device=x.device)[0]
        chunk.pending = hops.start_send(chunk.plan_b, chunk.recv_b, x, probs,
                                        **self._ep("dispatch/intra"))
        return chunk, None

    def stage_etp_gather(self, i, chunk: _Chunk):
        d = self.d
        rows = (hops.finish_send(chunk.pending, *chunk.held[:2]) if d.node_dedup
                else chunk.held)
        if d.tp_size > 1:
            x = rows[0]
            chunk.etp_sizes = comm.gather_counts(x.size(0), group=d.tp_group, device=x.device)
            chunk.pending = hops.start_etp_gather(
                *rows, d.local_expert_indices, chunk.etp_sizes, group=d.tp_group,
                topology=d.topology, tag=d._tag("dispatch/etp_gather"))
        else:
            chunk.pending = rows
        return chunk, None

    def stage_experts(self, i, chunk: _Chunk):
        d = self.d
        x, probs, mask = (hops.finish_etp_gather(chunk.pending, d.config.num_moe_experts)
                          if d.tp_size > 1 else chunk.pending)
        chunk.order = order_by_local_expert(mask, d.local_expert_indices)
        chunk.num_rows = x.size(0)
        permuted_probs = probs[chunk.order.rows, chunk.order.experts]
        out, bias = self.experts(x[chunk.order.rows], chunk.order.tokens_per_expert,
                                 permuted_probs)
        if bias is not None:
            raise ValueError("MoE experts with bias are not supported by the MoNTA dispatcher")
        rows_out = out.new_zeros(chunk.num_rows, out.size(-1)).index_add(0, chunk.order.rows, out)
        chunk.pending = (hops.start_etp_reduce(rows_out, chunk.etp_sizes, group=d.tp_group,
                                               topology=d.topology,
                                               tag=d._tag("combine/etp_reduce"))
                         if d.tp_size > 1 else rows_out)
        return chunk, None

    def stage_combine_b(self, i, chunk: _Chunk):
        rows_out = (hops.finish_etp_reduce(chunk.pending) if self.d.tp_size > 1
                    else chunk.pending)
        chunk.pending = (hops.start_return(chunk.plan_b, chunk.recv_b, rows_out,
                                           **self._ep("combine/intra"))
                         if self.d.node_dedup else rows_out)
        return chunk, None

    def stage_combine_a(self, i, chunk: _Chunk):
        d = self.d
        held_out = (hops.finish_return(chunk.pending, chunk.held[0].size(0)) if d.node_dedup
                    else chunk.pending)
        chunk.pending = hops.start_return(
            chunk.plan_a, chunk.recv_a, held_out,
            **self._ep("combine/inter" if d.node_dedup else "combine/flat"))
        return chunk, None

    def stage_finish(self, i, chunk: _Chunk):
        return hops.finish_return(chunk.pending, chunk.tokens[0].size(0)), None

    def __call__(self, x, probs, routing_map):
        """x [T, H], probs [T, E], routing_map [T, E] -> combined output [T, H]."""
        d = self.d
        bounds = torch.linspace(0, x.size(0), self.num_chunks + 1).round().long().tolist()
        chunks = []
        plan = plan_to_gateways if d.node_dedup else plan_to_owners
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            chunk = _Chunk(tokens=(x[lo:hi], probs[lo:hi]))
            chunk.plan_a = plan(routing_map[lo:hi], d.layout)
            chunks.append(chunk)
        # one count exchange for every chunk's stage A: [C, R] -> [C, R]
        recv = comm.exchange_counts([c.plan_a.splits for c in chunks], group=d.ep_group,
                                    device=x.device)
        for chunk, counts in zip(chunks, recv):
            chunk.recv_a = counts
        stages = [
            lambda i, _: self.stage_dispatch_a(i, chunks[i]),
            self.stage_dispatch_b, self.stage_etp_gather, self.stage_experts,
            self.stage_combine_b, self.stage_combine_a, self.stage_finish,
        ]
        outputs = comm.chunked_pipeline(len(chunks), stages)
        return torch.cat(outputs)

