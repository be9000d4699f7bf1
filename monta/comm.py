"""MoNTA's communication layer: variable-size collectives, async handles, chunk pipelines, and
exact per-link byte counters.

Every collective is one ``torch.autograd.Function`` whose backward is its dual::

    all_to_all_v(splits_in, splits_out)   <->  all_to_all_v(splits_out, splits_in)
    all_gather_v(sizes)                   <->  reduce_scatter_v(sizes)

Each takes the process group as a required keyword (``None`` is the default group, or a world of
one when torch.distributed is not initialised) and short-circuits when the group has one member:
no communication, no bytes counted. The device comes from the tensors (gloo on CPU, NCCL on GPU).
Split sizes are python ints and must be identical on every member where they describe the whole
group (``sizes``); gloo rejects tensor splits (``TypeError: all_to_all_single(): incompatible
function arguments``).

Byte accounting. A :class:`LinkBytes` counter records the *logical payload* each rank sends to
each peer, classified by the :class:`~monta.topology.Topology` link class of (me, peer) into
``"intra"`` or ``"inter"`` and keyed by a ``tag`` naming the phase (``"layer3/dispatch/inter"``;
backward passes add ``"/bwd"``). Rows sent to oneself are never counted. For an all-to-all this is
exactly what a direct implementation puts on the wire. For all-gather it is the unpadded input sent
once to every other member; ring or tree algorithms move the same payload along other routes, so
the counter is the algorithm-independent payload, not a packet capture. Counting is python-int
arithmetic on the calling thread: exact, no collectives, no device syncs.

Shape legend: W = group size, R = rows (tokens), ``...`` = trailing dims (e.g. hidden H).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist

from monta.topology import Topology

__all__ = [
    "LINK_BYTES", "Handle", "LinkBytes", "Pending", "all_gather_v", "all_gather_v_async",
    "all_reduce_sum", "all_to_all_v", "all_to_all_v_async", "chunked_pipeline", "count_bytes",
    "count_sends", "current_counter", "exchange_counts", "gather_counts", "group_size", "reduce_scatter_v",
]

_LINKS = ("intra", "inter")


class LinkBytes:
    """Payload bytes this rank sent to other ranks, by (tag, link class). Thread-safe."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def add(self, tag: str, link: str, nbytes: int) -> None:
        if link not in _LINKS or nbytes < 0:
            raise ValueError(
                f"link must be one of {_LINKS} and nbytes >= 0, got {link!r}, {nbytes}"
            )
        with self._lock:
            self._bytes[(tag, link)] = self._bytes.get((tag, link), 0) + int(nbytes)

    def by_link(self) -> dict[str, int]:
        """``{"intra": bytes, "inter": bytes}`` summed over tags."""
        with self._lock:
            items = self._bytes.items()
            return {link: sum(n for (_, lk), n in items if lk == link) for link in _LINKS}

    def by_tag(self) -> dict[str, dict[str, int]]:
        """``{tag: {"intra": bytes, "inter": bytes}}`` for every tag seen."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for (tag, link), n in self._bytes.items():
                out.setdefault(tag, dict.fromkeys(_LINKS, 0))[link] += n
        return out

    def reset(self) -> None:
        with self._lock:
            self._bytes.clear()

    def snapshot(self) -> LinkBytes:
        copy = LinkBytes()
        with self._lock:
            copy._bytes = dict(self._bytes)
        return copy

    def __repr__(self) -> str:
        return f"LinkBytes({self.by_tag()})"


LINK_BYTES = LinkBytes()  # where counting goes unless count_bytes() or counter= says otherwise
_COUNTERS: list[LinkBytes] = [LINK_BYTES]


@contextlib.contextmanager
def count_bytes(counter: LinkBytes) -> Iterator[LinkBytes]:
    """Send the counts of collectives *started* inside this block to ``counter`` (nests).

    A backward pass counts into the counter its forward used, wherever ``backward()`` runs.
    """
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.pop()


def current_counter() -> LinkBytes:
    """Where a collective started now counts (capture it to count a later backward there)."""
    return _COUNTERS[-1]


class Handle(Protocol):
    """Anything with ``wait()``: a :class:`Pending`, a torch.distributed ``Work``, ..."""

    def wait(self) -> Any: ...


class Pending:
    """An in-flight collective (the handle the ``*_async`` functions return): ``wait()`` blocks
    until the output tensor is valid; ``is_completed()`` polls."""

    def __init__(self, work: Any = None, finish: Callable[[], None] | None = None,
                 keep: tuple = ()) -> None:
        # keep: buffers the collective reads or writes, alive until wait() returns.
        self._work, self._finish, self._keep = work, finish, keep

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._finish is not None:
            self._finish()
            self._finish = None
        self._keep = ()

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()


# ---------------------------------------------------------------------------------------------
# Groups, link classes, counting

_GROUP_LINKS: dict[tuple[Any, Topology], tuple[str, ...]] = {}


def group_size(group: Any) -> int:
    """Members of ``group``; 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _peer_links(group: Any, topology: Topology) -> tuple[str, ...]:
    """Link class from this rank to each group-local rank ("self" for itself); cached per group."""
    key = (group, topology)
    if key not in _GROUP_LINKS:
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        if max(ranks) >= topology.world_size:
            raise ValueError(
                f"group ranks {ranks} exceed the topology's world_size={topology.world_size}"
            )
        me = dist.get_rank()
        _GROUP_LINKS[key] = tuple(topology.link_class(me, r) for r in ranks)
    return _GROUP_LINKS[key]


def _count(counter: LinkBytes, tag: str, links: Sequence[str], rows: Sequence[int],
           row_bytes: int) -> None:
    """Add ``rows[j] * row_bytes`` sent to group rank j under ``links[j]`` (self not counted)."""
    totals = dict.fromkeys(_LINKS, 0)
    for link, n in zip(links, rows):
        if link != "self":
            totals[link] += n * row_bytes
    for link, nbytes in totals.items():
        counter.add(tag, link, nbytes)


def _row_bytes(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def _count_rows(counter: LinkBytes, tag: str, links: Sequence[str], rows: Sequence[int],
                x: torch.Tensor, meta_columns: int) -> None:
    """Count ``rows[j]`` rows of ``x`` to peer j; the last ``meta_columns`` columns of a 2-D
    ``x`` are routing metadata riding along with the payload, counted under ``tag + "/meta"``
    (``phase/meta/bwd`` for a backward tag ``phase/bwd``)."""
    if meta_columns == 0:
        _count(counter, tag, links, rows, _row_bytes(x))
        return
    if x.dim() != 2 or not 0 < meta_columns <= x.shape[1]:
        raise ValueError(f"meta_columns={meta_columns} needs a 2-D tensor with at least that "
                         f"many columns, got shape {tuple(x.shape)}")
    _count(counter, tag, links, rows, (x.shape[1] - meta_columns) * x.element_size())
    # "/bwd" stays last, as for metadata sent on its own ("phase/meta/bwd")
    meta_tag = tag[:-4] + "/meta/bwd" if tag.endswith("/bwd") else tag + "/meta"
    _count(counter, meta_tag, links, rows, meta_columns * x.element_size())


def _check_splits(name: str, splits: Sequence[int], world: int, rows: int | None) -> list[int]:
    splits = [int(s) for s in splits]
    bad_sum = rows is not None and sum(splits) != rows
    if len(splits) != world or any(s < 0 for s in splits) or bad_sum:
        want = f" summing to {rows}" if rows is not None else ""
        raise ValueError(f"{name} must be {world} non-negative ints{want}, got {splits}")
    return splits


# ---------------------------------------------------------------------------------------------
# Raw async collectives (no autograd): the building blocks, also for custom autograd code


def all_to_all_v_async(
    x: torch.Tensor, input_splits: Sequence[int], output_splits: Sequence[int], *,
    group: Any, topology: Topology, tag: str, counter: LinkBytes | None = None,
    meta_columns: int = 0,
) -> tuple[torch.Tensor, Pending]:
    """Start an all-to-all with uneven splits; not differentiable.

    Args:
        x: [sum(input_splits), ...]; rows ``input_splits[j]`` (in order) go to group rank j.
        input_splits: rows sent to each group rank (W python ints).
        output_splits: rows received from each group rank (W python ints).
        meta_columns: trailing columns of a 2-D ``x`` that are routing metadata fused into the
            payload (one collective instead of several); counted under ``tag + "/meta"``.

    Returns:
        ``(out, handle)``: out is [sum(output_splits), ...], valid after ``handle.wait()``.
    """
    world = group_size(group)
    input_splits = _check_splits("input_splits", input_splits, world, x.shape[0])
    output_splits = _check_splits("output_splits", output_splits, world, None)
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    if world == 1:
        out.copy_(x)
        return out, Pending()
    counter = counter if counter is not None else _COUNTERS[-1]
    _count_rows(counter, tag, _peer_links(group, topology), input_splits, x, meta_columns)
    x = x.contiguous()
    work = dist.all_to_all_single(out, x, output_splits, input_splits, group=group, async_op=True)
    return out, Pending(work, keep=(x,))


# torch >= 2.13 names it all_gather_single and deprecates all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_v_async(
    x: torch.Tensor, sizes: Sequence[int], *,
    group: Any, topology: Topology, tag: str, counter: LinkBytes | None = None,
    meta_columns: int = 0,
) -> tuple[torch.Tensor, Pending]:
    """Start a gather of every member's rows; not differentiable.

    Uneven sizes are padded to ``max(sizes)`` rows (gloo's all_gather needs equal sizes) and
    trimmed in ``wait()``; the padding is not counted.

    Args:
        x: [sizes[me], ...].
        sizes: rows contributed by each group rank (W python ints, the same on every member).
        meta_columns: as in :func:`all_to_all_v_async`.

    Returns:
        ``(out, handle)``: out is [sum(sizes), ...] (member 0's rows first), valid after
        ``handle.wait()``.
    """
    world = group_size(group)
    sizes = _check_splits("sizes", sizes, world, None)
    me = dist.get_rank(group) if world > 1 else 0
    if x.shape[0] != sizes[me]:
        raise ValueError(f"x has {x.shape[0]} rows but sizes[{me}]={sizes[me]} (sizes={sizes})")
    if world == 1:
        return x.clone(), Pending()
    counter = counter if counter is not None else _COUNTERS[-1]
    _count_rows(counter, tag, _peer_links(group, topology), [x.shape[0]] * world, x,
                meta_columns)
    rows = max(sizes)
    if rows == 0:  # every member knows: nobody sends anything
        return x.new_empty((0, *x.shape[1:])), Pending()
    padded = x.contiguous()
    if x.shape[0] < rows:
        padded = torch.cat([padded, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])
    gathered = x.new_empty((world * rows, *x.shape[1:]))  # [W * max(sizes), ...]
    work = _all_gather_single(gathered, padded, group=group, async_op=True)
    if all(s == rows for s in sizes):
        return gathered, Pending(work, keep=(padded,))
    out = x.new_empty((sum(sizes), *x.shape[1:]))
    offsets = [0, *itertools.accumulate(sizes)]

    def trim() -> None:  # [W * max, ...] -> [sum(sizes), ...]
        for i, n in enumerate(sizes):
            out[offsets[i]:offsets[i] + n] = gathered[i * rows:i * rows + n]

    return out, Pending(work, trim, keep=(padded, gathered))


# ---------------------------------------------------------------------------------------------
# Autograd-aware collectives: forward and backward are duals


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, input_splits, output_splits, group, topology, tag, counter):
        ctx.saved = (input_splits, output_splits, group, topology, tag, counter)
        out, handle = all_to_all_v_async(x, input_splits, output_splits, group=group,
                                         topology=topology, tag=tag, counter=counter)
        handle.wait()
        return out

    @staticmethod
    def backward(ctx, grad):  # grad: [sum(output_splits), ...] -> [sum(input_splits), ...]
        input_splits, output_splits, group, topology, tag, counter = ctx.saved
        grad_x = _AllToAllV.apply(grad.contiguous(), output_splits, input_splits, group,
                                  topology, tag + "/bwd", counter)
        return grad_x, None, None, None, None, None, None


class _AllGatherV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, topology, tag, counter):
        ctx.saved = (sizes, group, topology, tag, counter)
        out, handle = all_gather_v_async(x, sizes, group=group, topology=topology, tag=tag,
                                         counter=counter)
        handle.wait()
        return out

    @staticmethod
    def backward(ctx, grad):  # grad: [sum(sizes), ...] -> [sizes[me], ...], summed over members
        sizes, group, topology, tag, counter = ctx.saved
        grad_x = _ReduceScatterV.apply(grad.contiguous(), sizes, group, topology, tag + "/bwd",
                                       counter)
        return grad_x, None, None, None, None, None


class _ReduceScatterV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, topology, tag, counter):
        ctx.saved = (sizes, group, topology, tag, counter)
        world, me = group_size(group), dist.get_rank(group)
        # Slice j goes to member j; I receive my slice from everyone, then sum locally. This is
        # one uneven all-to-all, which gloo supports (its reduce_scatter needs equal sizes).
        mine, handle = all_to_all_v_async(x, sizes, [sizes[me]] * world, group=group,
                                          topology=topology, tag=tag, counter=counter)
        handle.wait()
        return mine.view(world, sizes[me], *x.shape[1:]).sum(0)  # [W * n_me, ...] -> [n_me, ...]

    @staticmethod
    def backward(ctx, grad):  # grad: [sizes[me], ...] -> [sum(sizes), ...]
        sizes, group, topology, tag, counter = ctx.saved
        grad_x = _AllGatherV.apply(grad.contiguous(), sizes, group, topology, tag + "/bwd", counter)
        return grad_x, None, None, None, None, None


def all_to_all_v(
    x: torch.Tensor, input_splits: Sequence[int], output_splits: Sequence[int], *,
    group: Any, topology: Topology, tag: str, counter: LinkBytes | None = None,
) -> torch.Tensor:
    """Uneven all-to-all: [sum(input_splits), ...] -> [sum(output_splits), ...].

    Rows ``input_splits[j]`` go to group rank j; the output holds the rows from group rank 0,
    then 1, .... Backward is the all-to-all with the splits swapped, counted under
    ``tag + "/bwd"``. Bytes: ``input_splits[j] * row_bytes`` to each peer j != me.
    """
    if group_size(group) == 1:
        _check_splits("input_splits", input_splits, 1, x.shape[0])
        _check_splits("output_splits", output_splits, 1, x.shape[0])
        return x
    counter = counter if counter is not None else _COUNTERS[-1]
    return _AllToAllV.apply(x, list(input_splits), list(output_splits), group, topology, tag,
                            counter)


def all_gather_v(
    x: torch.Tensor, sizes: Sequence[int], *,
    group: Any, topology: Topology, tag: str, counter: LinkBytes | None = None,
) -> torch.Tensor:
    """Concatenate every member's rows: [sizes[me], ...] -> [sum(sizes), ...].

    Backward is :func:`reduce_scatter_v` (each member gets its own rows of the gradient, summed
    over the group). Bytes: ``sizes[me] * row_bytes`` to each peer (unpadded payload).
    """
    if group_size(group) == 1:
        _check_splits("sizes", sizes, 1, x.shape[0])
        return x
    counter = counter if counter is not None else _COUNTERS[-1]
    return _AllGatherV.apply(x, list(sizes), group, topology, tag, counter)


def reduce_scatter_v(
    x: torch.Tensor, sizes: Sequence[int], *,
    group: Any, topology: Topology, tag: str, counter: LinkBytes | None = None,
) -> torch.Tensor:
    """Sum over the group, keep my slice: [sum(sizes), ...] -> [sizes[me], ...].

    Member j's slice is rows ``sum(sizes[:j]) : sum(sizes[:j+1])``. Backward is
    :func:`all_gather_v`. Bytes: ``sizes[j] * row_bytes`` to each peer j.
    """
    world = group_size(group)
    _check_splits("sizes", sizes, world, x.shape[0])
    if world == 1:
        return x
    counter = counter if counter is not None else _COUNTERS[-1]
    return _ReduceScatterV.apply(x, list(sizes), group, topology, tag, counter)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; every member gets the sum. Backward sums the members' gradients:
    the strict mirror, right when members go on to use the sum differently (ds_tp does: each
    member returns it to different source ranks). megatron's identity backward assumes they
    don't."""

    @staticmethod
    def forward(ctx, x, group, topology, tag, counter):
        ctx.saved = (group, topology, tag, counter)
        _count(counter, tag, _peer_links(group, topology), [x.shape[0]] * group_size(group),
               _row_bytes(x))
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group, topology, tag, counter = ctx.saved
        return _AllReduceSum.apply(grad.contiguous(), group, topology, tag + "/bwd",
                                   counter), None, None, None, None


def all_reduce_sum(x: torch.Tensor, *, group: Any, topology: Topology, tag: str,
                   counter: LinkBytes | None = None) -> torch.Tensor:
    """Element-wise sum over the group (autograd: backward is the same sum). Bytes: the whole
    tensor to each peer, the payload of a direct all-reduce (a ring moves 2(W-1)/W of it)."""
    if group_size(group) == 1:
        return x
    counter = counter if counter is not None else _COUNTERS[-1]
    return _AllReduceSum.apply(x, group, topology, tag, counter)


def count_sends(rows_per_peer: Sequence[int], row_bytes: int, *, group: Any,
                topology: Topology, tag: str, counter: LinkBytes | None = None) -> None:
    """Record rows sent by a collective this module did not issue (megatron's own all-to-all)."""
    if group_size(group) == 1:
        return
    counter = counter if counter is not None else _COUNTERS[-1]
    _count(counter, tag, _peer_links(group, topology), [int(n) for n in rows_per_peer], row_bytes)


def exchange_counts(send_counts: Sequence[Sequence[int]], *, group: Any,
                    device: torch.device) -> list[list[int]]:
    """Split sizes for coming all-to-alls: ``send_counts[c][j]`` rows go to peer j in
    all-to-all c; returns ``recv[c][j]``, the rows peer j sends us. One tiny all-to-all for all
    of them (host ints: gloo and all_to_all_single want python split sizes). Not counted."""
    world = group_size(group)
    if world == 1:
        return [list(counts) for counts in send_counts]
    send = torch.tensor(send_counts, dtype=torch.int64, device=device)  # [C, W]
    send = send.t().contiguous()  # [W, C]: row j goes to peer j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.t().tolist()


def gather_counts(count: int, *, group: Any, device: torch.device) -> list[int]:
    """Every member's ``count`` (e.g. rows it contributes to an all_gather_v). Not counted."""
    world = group_size(group)
    if world == 1:
        return [count]
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return [int(c.item()) for c in every]


# ---------------------------------------------------------------------------------------------
# Chunked software pipeline


def chunked_pipeline(
    num_chunks: int, stages: Sequence[Callable[[int, Any], tuple[Any, Handle | None]]],
) -> list[Any]:
    """Run ``len(stages)`` stages over ``num_chunks`` chunks as a software pipeline.

    ``stages[s](i, value)`` starts stage s of chunk i (``value`` is what stage s-1 returned for
    chunk i, ``None`` for stage 0) and returns ``(value, handle)``; ``handle.wait()`` (if a handle
    is given) is called just before stage s+1 of chunk i needs ``value``. Each step starts the
    newest chunk's first stage *before* waiting on older chunks, so chunk i's stage s+1 runs
    while chunk i+1's stage s is in flight (L = launch, W = wait; two stages, three chunks)::

        step        0       1               2               3               4
        stage 0     L c0    L c1            L c2
        stage 1             W c0, L c0      W c1, L c1      W c2, L c2
        collect                             W c0            W c1            W c2

    Every rank must run the same stages in the same order (collectives are issued in that order).

    Returns:
        The last stage's value of each chunk, in chunk order.
    """
    depth = len(stages)
    inflight: list[tuple[Any, Handle | None]] = [(None, None)] * num_chunks
    results: list[Any] = [None] * num_chunks
    for step in range(num_chunks + depth):
        for s in range(depth + 1):  # s == depth: collect the finished chunk
            i = step - s
            if not 0 <= i < num_chunks:
                continue
            value, handle = inflight[i]
            if handle is not None:
                handle.wait()
            if s == depth:
                results[i] = value
            else:
                inflight[i] = stages[s](i, value)
    return results
