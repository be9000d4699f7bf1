"""Chunked, pipelined MoE forward for the MoNTA dispatcher (``--monta-chunks C``).

The layer's tokens are cut into C chunks; each chunk runs the whole MoE path, and the chunks are
software-pipelined so chunk i+1's inter-node all-to-all is in flight while chunk i crosses the
intra-node phases and the experts (stages of ``comm.chunked_pipeline``)::

    chunk 0:  A→ | wait A, B→ | wait B, ETP→ | wait, experts, RS→ | wait, B← | wait, A← | sum
    chunk 1:       A→         | wait A, B→   | ...

Backward is pipelined too, by construction: every collective is split into a *start* and a
*wait* autograd node. Autograd runs nodes in reverse creation order, so the wait node's backward
launches the gradient's collective and returns at once, the engine goes on with other chunks'
work, and the start node's backward (run later) waits for it — the mirror of the forward
schedule, without hand-written backward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from monta import comm
from monta.dispatch.plan import (
    ExpertOrder,
    SendPlan,
    all_columns,
    only_columns,
    order_by_local_expert,
    plan_to_gateways,
    plan_to_owners,
)


@dataclass
class _InFlight:
    """One collective between its start and wait nodes (forward and backward handles)."""

    launch_backward: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    forward_handle: Any = None
    backward_out: torch.Tensor | None = None
    backward_handle: Any = None


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, flight: _InFlight, launch):
        out, flight.forward_handle = launch(x)
        ctx.flight = flight
        return out

    @staticmethod
    def backward(ctx, grad):
        flight = ctx.flight
        flight.backward_handle.wait()
        return flight.backward_out, None, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, flight: _InFlight):
        flight.forward_handle.wait()
        ctx.flight = flight
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        flight = ctx.flight
        flight.backward_out, flight.backward_handle = flight.launch_backward(grad.contiguous())
        # the real gradient of the start node's input arrives later (flight.backward_out); this
        # pass-through only carries the dependency to _Start.backward, which waits for it
        return grad, None


def start_all_to_all(x, send, recv, *, group, topology, tag):
    """Differentiable async all-to-all: returns (placeholder, flight) for :func:`wait`."""
    flight = _InFlight(lambda g: comm.all_to_all_v_async(
        g, recv, send, group=group, topology=topology, tag=tag + "/bwd"))
    launch = lambda t: comm.all_to_all_v_async(  # noqa: E731
        t, send, recv, group=group, topology=topology, tag=tag)
    return _Start.apply(x, flight, launch), flight


def start_all_gather(x, sizes, *, group, topology, tag):
    """Differentiable async all-gather (backward: an all-to-all of slices, summed at wait)."""
    me = group.rank()
    world = len(sizes)

    def launch_backward(grad):  # reduce-scatter = all-to-all of slices; summed in _SumSlices
        out, handle = comm.all_to_all_v_async(grad, sizes, [sizes[me]] * world, group=group,
                                              topology=topology, tag=tag + "/bwd")
        return out, handle

    flight = _InFlight(launch_backward)
    launch = lambda t: comm.all_gather_v_async(  # noqa: E731
        t, sizes, group=group, topology=topology, tag=tag)
    return _GatherStart.apply(x, flight, launch, world), flight


class _GatherStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, flight, launch, world):
        out, flight.forward_handle = launch(x)
        ctx.flight, ctx.world = flight, world
        return out

    @staticmethod
    def backward(ctx, grad):
        flight = ctx.flight
        flight.backward_handle.wait()
        slices = flight.backward_out  # [W * rows_me, ...]
        return slices.view(ctx.world, -1, *slices.shape[1:]).sum(0), None, None, None


def wait(placeholder, flight):
    return _Wait.apply(placeholder, flight)


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
    pending: tuple = ()
    held: tuple = ()
    num_rows: int = 0


class PipelinedMoE:
    """Runs one MoE layer's dispatch → experts → combine over C pipelined chunks."""

    def __init__(self, dispatcher, experts, num_chunks: int):
        self.d, self.experts, self.num_chunks = dispatcher, experts, num_chunks

    # each stage returns (chunk, None): waits happen inside the next stage as autograd nodes
    def _start_send(self, plan: SendPlan, recv, x, probs, phase):
        d = self.d
        kw = dict(group=d.ep_group, topology=d.topology)
        hidden = start_all_to_all(x[plan.source_rows], plan.splits, recv,
                                  tag=d._tag(phase), **kw)
        sent_probs, sent_mask = plan.compact(probs)
        sent_probs = start_all_to_all(sent_probs, plan.splits, recv,
                                      tag=d._tag(phase + "/meta"), **kw)
        mask, mask_handle = comm.all_to_all_v_async(sent_mask, plan.splits, recv,
                                                    tag=d._tag(phase + "/meta"), **kw)
        return hidden, sent_probs, (mask, mask_handle)

    @staticmethod
    def _finish_send(plan: SendPlan, pending, x, probs):
        (hidden, hidden_flight), (sent_probs, probs_flight), (mask, mask_handle) = pending
        hidden, sent_probs = wait(hidden, hidden_flight), wait(sent_probs, probs_flight)
        mask_handle.wait()
        sent_probs, mask = plan.expand(sent_probs, mask, probs.size(1))
        kept_probs = probs[plan.kept_rows] * plan.kept_masks
        return (torch.cat([x[plan.kept_rows], hidden]), torch.cat([kept_probs, sent_probs]),
                torch.cat([plan.kept_masks, mask]))

    def stage_dispatch_a(self, i, chunk: _Chunk):
        x, probs = chunk.tokens
        chunk.pending = self._start_send(chunk.plan_a, chunk.recv_a, x, probs,
                                         "dispatch/inter" if self.d.node_dedup else "dispatch/flat")
        return chunk, None

    def stage_dispatch_b(self, i, chunk: _Chunk):
        d = self.d
        held = self._finish_send(chunk.plan_a, chunk.pending, *chunk.tokens)
        if not d.node_dedup:
            chunk.held, chunk.pending = held, ()
            return chunk, None
        chunk.held = held
        chunk.plan_b = plan_to_owners(held[2], d.layout, only_node=d.layout.my_node)
        chunk.recv_b = comm.exchange_counts([chunk.plan_b.splits], group=d.ep_group,
                                            device=held[0].device)[0]
        chunk.pending = self._start_send(chunk.plan_b, chunk.recv_b, held[0], held[1],
                                         "dispatch/intra")
        return chunk, None

    def stage_etp_gather(self, i, chunk: _Chunk):
        d = self.d
        rows = (self._finish_send(chunk.plan_b, chunk.pending, *chunk.held[:2])
                if d.node_dedup else chunk.held)
        if d.tp_size > 1:
            x, probs, mask = rows
            probs, mask = only_columns(probs, mask, d.local_expert_indices)
            chunk.etp_sizes = comm.gather_counts(x.size(0), group=d.tp_group, device=x.device)
            kw = dict(group=d.tp_group, topology=d.topology)
            chunk.pending = (
                start_all_gather(x, chunk.etp_sizes, tag=d._tag("dispatch/etp_gather"), **kw),
                start_all_gather(probs, chunk.etp_sizes, tag=d._tag("dispatch/etp_gather/meta"),
                                 **kw),
                comm.all_gather_v_async(mask, chunk.etp_sizes,
                                        tag=d._tag("dispatch/etp_gather/meta"), **kw))
        else:
            chunk.pending = rows
        return chunk, None

    def stage_experts(self, i, chunk: _Chunk):
        d = self.d
        if d.tp_size > 1:
            (x, xf), (probs, pf), (mask, mask_handle) = chunk.pending
            x, probs = wait(x, xf), wait(probs, pf)
            mask_handle.wait()
            probs, mask = all_columns(probs, mask, d.local_expert_indices,
                                      d.config.num_moe_experts)
        else:
            x, probs, mask = chunk.pending
        chunk.order = order_by_local_expert(mask, d.local_expert_indices)
        chunk.num_rows = x.size(0)
        permuted_probs = probs[chunk.order.rows, chunk.order.experts]
        out, bias = self.experts(x[chunk.order.rows], chunk.order.tokens_per_expert,
                                 permuted_probs)
        if bias is not None:
            raise ValueError("MoE experts with bias are not supported by the MoNTA dispatcher")
        rows_out = out.new_zeros(chunk.num_rows, out.size(-1)).index_add(0, chunk.order.rows, out)
        if d.tp_size > 1:
            me, world = d.tp_group.rank(), d.tp_size
            sizes = chunk.etp_sizes
            # reduce-scatter over ETP = all-to-all of row slices, summed after the wait
            chunk.pending = (start_all_to_all(rows_out, sizes, [sizes[me]] * world,
                                              group=d.tp_group, topology=d.topology,
                                              tag=d._tag("combine/etp_reduce")), world)
        else:
            chunk.pending = rows_out
        return chunk, None

    def _rows_back(self, chunk):
        if self.d.tp_size > 1:
            (slices, flight), world = chunk.pending
            slices = wait(slices, flight)
            return slices.view(world, -1, *slices.shape[1:]).sum(0)
        return chunk.pending

    def _start_return(self, plan: SendPlan, recv, rows_out, phase):
        d = self.d
        kept = plan.kept_rows.numel()
        back = start_all_to_all(rows_out[kept:], recv, plan.splits, group=d.ep_group,
                                topology=d.topology, tag=d._tag(phase))
        return rows_out[:kept], back

    @staticmethod
    def _finish_return(plan: SendPlan, pending, num_rows):
        kept_out, (back, flight) = pending
        back = wait(back, flight)
        out = kept_out.new_zeros(num_rows, kept_out.size(-1))
        return out.index_add(0, plan.kept_rows, kept_out).index_add(0, plan.source_rows, back)

    def stage_combine_b(self, i, chunk: _Chunk):
        rows_out = self._rows_back(chunk)
        if self.d.node_dedup:
            chunk.pending = self._start_return(chunk.plan_b, chunk.recv_b, rows_out,
                                               "combine/intra")
        else:
            chunk.pending = rows_out
        return chunk, None

    def stage_combine_a(self, i, chunk: _Chunk):
        held_out = (self._finish_return(chunk.plan_b, chunk.pending, chunk.held[0].size(0))
                    if self.d.node_dedup else chunk.pending)
        chunk.pending = self._start_return(chunk.plan_a, chunk.recv_a, held_out,
                                           "combine/inter" if self.d.node_dedup
                                           else "combine/flat")
        return chunk, None

    def stage_finish(self, i, chunk: _Chunk):
        out = self._finish_return(chunk.plan_a, chunk.pending, chunk.tokens[0].size(0))
        return out, None

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

