"""comm: collectives against single-process references, exact byte counters, async, pipelining.

The multi-rank checks run in one 4-rank gloo job (`_comm_cases`) on an emulated 2-node layout
(ranks 0,1 on node 0; 2,3 on node 1). Every rank builds every rank's inputs from a shared seed, so
it can compute its expected output and gradient locally.
"""

import itertools
import time

import pytest
import torch
import torch.distributed as dist

from monta.comm import (
    LINK_BYTES, LinkBytes, all_gather_v, all_gather_v_async, all_to_all_v, all_to_all_v_async,
    chunked_pipeline, count_bytes, reduce_scatter_v,
)
from monta.testing import run_distributed
from monta.topology import Topology

TOPO = Topology.uniform(4, 2)


# ------------------------------------------------------------------------ single process


def test_link_bytes_counts_by_tag_and_link():
    c = LinkBytes()
    c.add("a", "intra", 10)
    c.add("a", "inter", 3)
    c.add("b", "inter", 4)
    c.add("a", "intra", 1)
    assert c.by_link() == {"intra": 11, "inter": 7}
    assert c.by_tag() == {"a": {"intra": 11, "inter": 3}, "b": {"intra": 0, "inter": 4}}
    snap = c.snapshot()
    c.reset()
    assert c.by_tag() == {} and c.by_link() == {"intra": 0, "inter": 0}
    assert snap.by_link() == {"intra": 11, "inter": 7}
    with pytest.raises(ValueError, match="got 'self', 5"):
        c.add("a", "self", 5)


def test_count_bytes_nests_as_a_stack():
    from monta.comm import _COUNTERS

    a, b = LinkBytes(), LinkBytes()
    with count_bytes(a):
        with count_bytes(b):
            with count_bytes(a):
                assert _COUNTERS[-1] is a
            assert _COUNTERS[-1] is b
        assert _COUNTERS[-1] is a
    assert _COUNTERS == [LINK_BYTES]


def test_world_of_one_short_circuits():
    assert not dist.is_initialized()
    x = torch.randn(5, 3, requires_grad=True)
    LINK_BYTES.reset()
    kw = dict(group=None, topology=Topology((0,)), tag="t")
    assert all_to_all_v(x, [5], [5], **kw) is x
    assert all_gather_v(x, [5], **kw) is x
    assert reduce_scatter_v(x, [5], **kw) is x
    out, handle = all_to_all_v_async(x.detach(), [5], [5], **kw)
    handle.wait()
    assert torch.equal(out, x)
    out, handle = all_gather_v_async(x.detach(), [5], **kw)
    handle.wait()
    assert torch.equal(out, x)
    assert LINK_BYTES.by_tag() == {}
    with pytest.raises(ValueError, match=r"input_splits must be 1 non-negative ints summing to 5, "
                                         r"got \[4\]"):
        all_to_all_v(x, [4], [5], **kw)
    with pytest.raises(ValueError, match=r"x has 5 rows but sizes\[0\]=2"):
        all_gather_v_async(x, [2], **kw)


class _FakeHandle:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait(self):
        self.log.append(f"W {self.name}")


def test_chunked_pipeline_schedule_and_results():
    log = []

    def stage(s):
        def run(i, value):
            log.append(f"L s{s} c{i}")
            return (value or []) + [(s, i)], _FakeHandle(log, f"s{s} c{i}")
        return run

    results = chunked_pipeline(3, [stage(0), stage(1)])
    assert results == [[(0, i), (1, i)] for i in range(3)]  # same as running chunks one by one
    assert log == [
        "L s0 c0",
        "L s0 c1", "W s0 c0", "L s1 c0",               # c0's stage 1 runs while c1's stage 0 flies
        "L s0 c2", "W s0 c1", "L s1 c1", "W s1 c0",
        "W s0 c2", "L s1 c2", "W s1 c1",
        "W s1 c2",
    ]
    assert chunked_pipeline(2, [lambda i, v: (i * 10, None)]) == [0, 10]
    assert chunked_pipeline(0, [stage(0)]) == []


# ------------------------------------------------------------------------ 4 ranks


def _randn(shape, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _expected_bytes(me, granks, rows_to, row_bytes):
    """{"intra", "inter"} bytes for rows_to[j] rows sent to group rank j (self excluded)."""
    out = {"intra": 0, "inter": 0}
    for j, n in enumerate(rows_to):
        link = TOPO.link_class(me, granks[j])
        if link != "self":
            out[link] += n * row_bytes
    return out


def _check_all_to_all(me, group, granks, S, rest, dtype, seed):
    """S[i][j]: rows group rank i sends to group rank j."""
    W, g = len(granks), granks.index(me)
    X = [_randn((sum(S[i]), *rest), seed + i, dtype) for i in range(W)]
    recv = [[S[i][j] for i in range(W)] for j in range(W)]  # recv[j][i]: rows j gets from i
    G = [_randn((sum(recv[j]), *rest), seed + 100 + j, dtype) for j in range(W)]
    off_send = [[sum(S[i][:j]) for j in range(W)] for i in range(W)]
    off_recv = [[sum(recv[j][:i]) for i in range(W)] for j in range(W)]
    want = torch.cat([X[i][off_send[i][g]:off_send[i][g] + S[i][g]] for i in range(W)])
    want_grad = torch.cat([G[j][off_recv[j][g]:off_recv[j][g] + S[g][j]] for j in range(W)])

    counter = LinkBytes()
    x = X[g].clone().requires_grad_(True)
    out = all_to_all_v(x, S[g], recv[g], group=group, topology=TOPO, tag="a2a", counter=counter)
    assert out.dtype == dtype and torch.equal(out, want), (S, g)
    (out * G[g]).sum().backward()
    assert torch.equal(x.grad, want_grad), (S, g)
    row_bytes = torch.Size(rest).numel() * X[g].element_size()
    assert counter.by_tag() == {
        "a2a": _expected_bytes(me, granks, S[g], row_bytes),
        "a2a/bwd": _expected_bytes(me, granks, recv[g], row_bytes),
    }, (S, g, dtype)

    async_counter = LinkBytes()
    out, handle = all_to_all_v_async(X[g], S[g], recv[g], group=group, topology=TOPO,
                                     tag="a2a", counter=async_counter)
    handle.wait()
    assert torch.equal(out, want)
    assert async_counter.by_tag() == {"a2a": counter.by_tag()["a2a"]}
    return counter.by_link()


def _check_gather_scatter(me, group, granks, sizes, rest, dtype, seed):
    W, g = len(granks), granks.index(me)
    off = [sum(sizes[:j]) for j in range(W + 1)]
    row_bytes = torch.Size(rest).numel() * torch.empty((), dtype=dtype).element_size()

    # all_gather_v: forward concatenates, backward sums my rows of everyone's gradient.
    X = [_randn((sizes[i], *rest), seed + i, dtype) for i in range(W)]
    G = [_randn((off[W], *rest), seed + 100 + i, dtype) for i in range(W)]
    counter = LinkBytes()
    x = X[g].clone().requires_grad_(True)
    out = all_gather_v(x, sizes, group=group, topology=TOPO, tag="ag", counter=counter)
    assert torch.equal(out, torch.cat(X)), (sizes, g)
    (out * G[g]).sum().backward()
    want_grad = torch.stack([G[i][off[g]:off[g + 1]] for i in range(W)]).sum(0)
    torch.testing.assert_close(x.grad, want_grad)
    assert counter.by_tag() == {
        "ag": _expected_bytes(me, granks, [sizes[g]] * W, row_bytes),
        "ag/bwd": _expected_bytes(me, granks, sizes, row_bytes),
    }, (sizes, g)
    async_out, handle = all_gather_v_async(X[g], sizes, group=group, topology=TOPO, tag="ag",
                                           counter=LinkBytes())
    handle.wait()
    assert torch.equal(async_out, out)

    # reduce_scatter_v: forward sums my slice over members, backward gathers the gradients.
    X = [_randn((off[W], *rest), seed + 200 + i, dtype) for i in range(W)]
    G = [_randn((sizes[i], *rest), seed + 300 + i, dtype) for i in range(W)]
    counter = LinkBytes()
    x = X[g].clone().requires_grad_(True)
    out = reduce_scatter_v(x, sizes, group=group, topology=TOPO, tag="rs", counter=counter)
    torch.testing.assert_close(out, torch.stack([X[i][off[g]:off[g + 1]] for i in range(W)]).sum(0))
    (out * G[g]).sum().backward()
    assert torch.equal(x.grad, torch.cat(G)), (sizes, g)
    assert counter.by_tag() == {
        "rs": _expected_bytes(me, granks, sizes, row_bytes),
        "rs/bwd": _expected_bytes(me, granks, [sizes[g]] * W, row_bytes),
    }, (sizes, g)


def _split_patterns(W, gen):
    yield torch.randint(0, 4, (W, W), generator=gen).tolist()  # uneven, some zeros
    yield torch.randint(0, 6, (W, W), generator=gen).tolist()
    yield [[0] * W for _ in range(W)]  # nothing at all
    yield [[(2 * i + 1) * (j == 1) for j in range(W)] for i in range(W)]  # all -> group rank 1
    yield [[5 * (i == j) for j in range(W)] for i in range(W)]  # self only: no bytes


def _in_flight(me, W):
    """Two async all-to-alls started before rank 0 joins: both are pending at once on ranks 1-3."""
    if me == 0:
        time.sleep(0.3)
    x = torch.arange(2.0 * W).view(W, 2) + 10 * me
    t0 = time.perf_counter()
    out1, h1 = all_to_all_v_async(x, [1] * W, [1] * W, group=None, topology=TOPO, tag="f1")
    out2, h2 = all_to_all_v_async(2 * x, [1] * W, [1] * W, group=None, topology=TOPO, tag="f2")
    launch_s = time.perf_counter() - t0
    pending = (not h1.is_completed(), not h2.is_completed())
    h2.wait()
    h1.wait()
    want = torch.stack([torch.arange(2.0 * me, 2.0 * me + 2) + 10 * i for i in range(W)])
    assert torch.equal(out1, want) and torch.equal(out2, 2 * want)
    return {"launch_s": launch_s, "pending": pending}


def _pipeline_matches_sequential(me, W, intra_group):
    """a2a (world) -> all-gather (node) -> compute, 3 chunks: pipelined == one after another."""
    gen = torch.Generator().manual_seed(7)
    chunks = [torch.randint(0, 3, (W, W), generator=gen).tolist() for _ in range(3)]
    data = [_randn((sum(S[me]), 4), 1000 + 10 * c + me, torch.float32)
            for c, S in enumerate(chunks)]
    node_peers = TOPO.ranks_on_node(TOPO.node(me))

    def recv(S, j):
        return sum(S[i][j] for i in range(W))

    def a2a(i, _):
        S = chunks[i]
        return all_to_all_v_async(data[i], S[me], [S[k][me] for k in range(W)], group=None,
                                  topology=TOPO, tag=f"c{i}/a2a")

    def gather(i, x):
        sizes = [recv(chunks[i], j) for j in node_peers]
        return all_gather_v_async(x, sizes, group=intra_group, topology=TOPO, tag=f"c{i}/ag")

    def compute(i, x):
        return x * 2 + i, None

    with count_bytes(LinkBytes()) as piped_bytes:
        piped = chunked_pipeline(3, [a2a, gather, compute])
    with count_bytes(LinkBytes()) as seq_bytes:
        sequential = []
        for i in range(3):
            value = None
            for stage in (a2a, gather, compute):
                value, handle = stage(i, value)
                if handle is not None:
                    handle.wait()
            sequential.append(value)
    assert all(torch.equal(a, b) for a, b in zip(piped, sequential))
    assert piped_bytes.by_tag() == seq_bytes.by_tag() and len(seq_bytes.by_tag()) == 6


def _comm_cases(rank: int, world_size: int) -> dict:
    W = world_size
    subgroups = {name: [dist.new_group(ranks) for ranks in pairs] for name, pairs in
                 (("cross", ([0, 2], [1, 3])), ("intra", ([0, 1], [2, 3])))}
    groups = {
        "world": (None, list(range(W))),
        "cross": (subgroups["cross"][rank % 2], [rank % 2, rank % 2 + 2]),
        "intra": (subgroups["intra"][rank // 2], [rank // 2 * 2, rank // 2 * 2 + 1]),
    }
    cases = 0
    bytes_by_dtype = {}
    for (name, (group, granks)), dtype in itertools.product(
        groups.items(), (torch.float64, torch.float32, torch.bfloat16)
    ):  # the same split patterns for each dtype
        gen = torch.Generator().manual_seed(1234)
        for p, S in enumerate(_split_patterns(len(granks), gen)):
            rest = ((), (3,), (2, 3))[p % 3]
            seed = 10_000 * cases
            by_link = _check_all_to_all(rank, group, granks, S, rest, dtype, seed)
            if name == "world" and p == 0:
                bytes_by_dtype[str(dtype)] = by_link
            sizes = [row[0] for row in S]
            _check_gather_scatter(rank, group, granks, sizes, rest, dtype, seed)
            cases += 1
    _check_gather_scatter(rank, None, list(range(W)), [3] * W, (2,), torch.float32, 5)  # equal

    # Where counts go: the default counter, count_bytes(), and backward after the block.
    x = torch.ones(W, 2, requires_grad=True)
    LINK_BYTES.reset()
    all_to_all_v(x, [1] * W, [1] * W, group=None, topology=TOPO, tag="default")
    mine = LinkBytes()
    with count_bytes(mine):
        out = all_to_all_v(x, [1] * W, [1] * W, group=None, topology=TOPO, tag="ctx")
    out.sum().backward()
    row = 2 * 4
    assert LINK_BYTES.by_tag() == {"default": {"intra": row, "inter": 2 * row}}
    assert mine.by_tag() == {"ctx": {"intra": row, "inter": 2 * row},
                             "ctx/bwd": {"intra": row, "inter": 2 * row}}

    errors = []
    for call in (
        lambda: all_to_all_v(x, [1] * (W - 1), [1] * W, group=None, topology=TOPO, tag="e"),
        lambda: all_to_all_v(x, [2, 2, 1, -1], [1] * W, group=None, topology=TOPO, tag="e"),
        lambda: all_gather_v(x, [1] * W, group=None, topology=TOPO, tag="e"),
        lambda: reduce_scatter_v(x, [2] * W, group=None, topology=TOPO, tag="e"),
        lambda: all_to_all_v(x, [1] * W, [1] * W, group=None, topology=Topology((0, 0)), tag="e"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        errors.append(str(info.value))

    in_flight = _in_flight(rank, W)
    _pipeline_matches_sequential(rank, W, subgroups["intra"][rank // 2])
    return {"cases": cases, "bytes_by_dtype": bytes_by_dtype, "errors": errors,
            "in_flight": in_flight}


def test_collectives_bytes_async_and_pipeline_on_4_ranks():
    results = run_distributed(_comm_cases, 4, timeout_s=120)
    assert results[0]["cases"] == 3 * 3 * 5
    for r in results:  # bytes scale with the element size: fp64 = 2 x fp32 = 4 x bf16
        b = r["bytes_by_dtype"]
        assert b["torch.float64"] == {k: 2 * v for k, v in b["torch.float32"].items()}
        assert b["torch.float32"] == {k: 2 * v for k, v in b["torch.bfloat16"].items()}
    assert results[0]["errors"] == [
        "input_splits must be 4 non-negative ints summing to 4, got [1, 1, 1]",
        "input_splits must be 4 non-negative ints summing to 4, got [2, 2, 1, -1]",
        "x has 4 rows but sizes[0]=1 (sizes=[1, 1, 1, 1])",
        "sizes must be 4 non-negative ints summing to 4, got [2, 2, 2, 2]",
        "group ranks [0, 1, 2, 3] exceed the topology's world_size=2",
    ]
    for r in results[1:]:  # rank 0 joined 0.3 s late: both were in flight, launch did not block
        assert r["in_flight"]["pending"] == (True, True)
        assert r["in_flight"]["launch_s"] < 0.1
