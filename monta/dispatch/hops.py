"""One hop of the MoNTA dispatch, started now and finished later: the whole collective story.

A *hop* moves routing rows between ranks: the token's hidden state plus the router
probabilities and expert mask restricted to the experts at the destination. The metadata rides
in the same message as the hidden state (``[n, H + W + W]``, or ``[n, H + W]`` plus a separate
probabilities message when their dtype differs from the hidden state's, e.g. bf16 activations
with fp32 router probabilities), so a hop is one collective, not three: on a fast link the fixed
cost per collective, not the bytes, decides who wins at top-1/2.

Every hop is split into ``start_*`` (launch the collective, return at once) and ``finish_*``
(wait, unpack). The unchunked dispatcher calls them back to back; the chunked pipeline
(:mod:`monta.dispatch.pipelined`) runs other chunks' work in between. Both directions overlap:
each collective is a *start* and a *wait* autograd node, autograd runs nodes in reverse creation
order, so the wait node's backward launches the gradient's collective and returns at once and
the start node's backward (run later) waits for it — the mirror of the forward schedule without
a hand-written backward.

Shapes: H hidden, E experts, W routing columns a destination can serve (E/R to an owner rank,
E/N to a node's gateway, E/EP for an expert-TP gather), n rows sent, m rows received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from monta import comm
from monta.dispatch.plan import SendPlan, all_columns, only_columns


# ---------------------------------------------------------------------------------------------
# Async collectives as autograd start/wait pairs


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


class _GatherStart(torch.autograd.Function):
    """Start of an all-gather; its backward sums the slices the reduce-scatter brought back."""

    @staticmethod
    def forward(ctx, x, flight: _InFlight, launch, world: int):
        out, flight.forward_handle = launch(x)
        ctx.flight, ctx.world = flight, world
        return out

    @staticmethod
    def backward(ctx, grad):
        flight = ctx.flight
        flight.backward_handle.wait()
        slices = flight.backward_out  # [W * rows_me, ...]
        return slices.view(ctx.world, -1, *slices.shape[1:]).sum(0), None, None, None


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
        # pass-through only carries the dependency to the start node's backward, which waits
        return grad, None


Started = tuple[torch.Tensor, _InFlight]
"""A collective's placeholder output and its flight; :func:`wait` makes the output valid."""


def start_all_to_all(x, send, recv, *, group, topology, tag, meta_columns: int = 0) -> Started:
    """Differentiable async all-to-all (backward: the all-to-all with the splits swapped)."""
    counter = comm.current_counter()
    kw = dict(group=group, topology=topology, counter=counter, meta_columns=meta_columns)
    flight = _InFlight(lambda g: comm.all_to_all_v_async(g, recv, send, tag=tag + "/bwd", **kw))
    launch = lambda t: comm.all_to_all_v_async(t, send, recv, tag=tag, **kw)  # noqa: E731
    return _Start.apply(x, flight, launch), flight


def start_all_gather(x, sizes, *, group, topology, tag, meta_columns: int = 0) -> Started:
    """Differentiable async all-gather (backward: a reduce-scatter, as an all-to-all of slices
    summed in the start node's backward — gloo's reduce_scatter wants equal sizes)."""
    me, world = group.rank(), len(sizes)
    kw = dict(group=group, topology=topology, counter=comm.current_counter(),
              meta_columns=meta_columns)
    flight = _InFlight(lambda g: comm.all_to_all_v_async(g, sizes, [sizes[me]] * world,
                                                         tag=tag + "/bwd", **kw))
    launch = lambda t: comm.all_gather_v_async(t, sizes, tag=tag, **kw)  # noqa: E731
    return _GatherStart.apply(x, flight, launch, world), flight


def wait(started: Started) -> torch.Tensor:
    return _Wait.apply(*started)


# ---------------------------------------------------------------------------------------------
# Rows with fused routing metadata


def _pack(x: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor):
    """[n, H] + [n, W] probs + [n, W] mask -> one [n, H + (W) + W] message (+ probs apart).

    The mask travels as 0/1 in x's dtype (exact in any float type). Probabilities join only
    when they share x's dtype: rounding fp32 router probabilities to bf16 would change results.
    """
    mask = mask.to(x.dtype)
    if probs.dtype == x.dtype:
        return torch.cat([x, probs, mask], dim=1), None
    return torch.cat([x, mask], dim=1), probs


def _unpack(message: torch.Tensor, hidden: int, width: int, separate_probs):
    """Inverse of :func:`_pack` (differentiable in x and probs)."""
    x, mask = message[:, :hidden], message[:, message.size(1) - width:]
    probs = message[:, hidden:hidden + width] if separate_probs is None else separate_probs
    return x, probs, mask


@dataclass
class SendInFlight:
    plan: SendPlan
    message: Started
    probs: Started | None
    hidden: int
    width: int


def start_send(plan: SendPlan, recv: list[int], x, probs, *, group, topology,
               tag) -> SendInFlight:
    """Send the rows ``plan`` builds from local rows ``x`` [T, H] / ``probs`` [T, E]."""
    sent_probs, sent_mask = plan.compact(probs)  # [n, W] each
    message, apart = _pack(x[plan.source_rows], sent_probs, sent_mask)
    kw = dict(group=group, topology=topology)
    started = start_all_to_all(message, plan.splits, recv, tag=tag,
                               meta_columns=message.size(1) - x.size(1), **kw)
    probs_started = (None if apart is None else
                     start_all_to_all(apart, plan.splits, recv, tag=tag + "/meta", **kw))
    return SendInFlight(plan, started, probs_started, x.size(1), sent_mask.size(1))


def finish_send(hop: SendInFlight, x, probs):
    """Rows here after the hop: the kept local rows first, then the received ones.

    Returns ([k + m, H] hidden, [k + m, E] probabilities, [k + m, E] bool mask).
    """
    plan = hop.plan
    recv_x, recv_probs, recv_mask = _unpack(
        wait(hop.message), hop.hidden, hop.width,
        None if hop.probs is None else wait(hop.probs))
    recv_probs, recv_mask = plan.expand(recv_probs, recv_mask, probs.size(1))
    kept_probs = probs[plan.kept_rows] * plan.kept_masks
    return (torch.cat([x[plan.kept_rows], recv_x]), torch.cat([kept_probs, recv_probs]),
            torch.cat([plan.kept_masks, recv_mask]))


def start_return(plan: SendPlan, recv: list[int], rows_out, *, group, topology, tag):
    """The way back of a :func:`start_send` hop: outputs [k + m, H] of the rows it produced."""
    kept = plan.kept_rows.numel()
    back = start_all_to_all(rows_out[kept:], recv, plan.splits, group=group, topology=topology,
                            tag=tag)
    return plan, rows_out[:kept], back


def finish_return(pending, num_rows: int) -> torch.Tensor:
    """Sum each row's outputs into the local row it was built from: [num_rows, H]."""
    plan, kept_out, back = pending
    out = kept_out.new_zeros(num_rows, kept_out.size(-1))
    return out.index_add(0, plan.kept_rows, kept_out).index_add(0, plan.source_rows, wait(back))


# ---------------------------------------------------------------------------------------------
# Expert-TP: every expert shard sees the rows of all its ETP peers


@dataclass
class GatherInFlight:
    message: Started
    probs: Started | None
    hidden: int
    columns: list[int]


def start_etp_gather(x, probs, mask, local_experts: list[int], sizes: list[int], *, group,
                     topology, tag) -> GatherInFlight:
    """All-gather rows over expert-TP; only this EP rank's routing columns travel."""
    local_probs, local_mask = only_columns(probs, mask, local_experts)
    message, apart = _pack(x, local_probs, local_mask)
    kw = dict(group=group, topology=topology)
    started = start_all_gather(message, sizes, tag=tag, meta_columns=message.size(1) - x.size(1),
                               **kw)
    probs_started = (None if apart is None else
                     start_all_gather(apart, sizes, tag=tag + "/meta", **kw))
    return GatherInFlight(started, probs_started, x.size(1), list(local_experts))


def finish_etp_gather(hop: GatherInFlight, num_experts: int):
    """([Σsizes, H], [Σsizes, E] probabilities, [Σsizes, E] bool mask)."""
    x, probs, mask = _unpack(wait(hop.message), hop.hidden, len(hop.columns),
                             None if hop.probs is None else wait(hop.probs))
    probs, mask = all_columns(probs, mask, hop.columns, num_experts)
    return x, probs, mask


def start_etp_reduce(rows_out, sizes: list[int], *, group, topology, tag):
    """Reduce-scatter over expert-TP as an all-to-all of row slices (summed at the finish)."""
    me, world = group.rank(), len(sizes)
    return start_all_to_all(rows_out, sizes, [sizes[me]] * world, group=group,
                            topology=topology, tag=tag), world


def finish_etp_reduce(pending) -> torch.Tensor:
    started, world = pending
    slices = wait(started)
    return slices.view(world, -1, *slices.shape[1:]).sum(0)
