"""Topology: layouts, link classes, detection (flag, env, torchrun, host names), layout checks."""

import logging
import os
import socket

import pytest

from monta.testing import run_distributed
from monta.topology import Topology, detect_topology, groups_from_parallel_state, validate_layout

_DETECT_ENV = ("MONTA_RANKS_PER_NODE", "GROUP_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def test_uniform_layout_and_link_classes():
    topo = Topology.uniform(8, 4)
    assert topo.node_of_rank == (0, 0, 0, 0, 1, 1, 1, 1)
    assert (topo.world_size, topo.num_nodes, topo.ranks_per_node) == (8, 2, 4)
    assert topo.ranks_on_node(1) == (4, 5, 6, 7)
    assert [topo.local_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert topo.link_class(2, 2) == "self"
    assert topo.link_class(0, 3) == "intra"
    assert topo.link_class(3, 4) == "inter"
    assert str(topo).startswith("2 node(s) x 4 rank(s)")


def test_irregular_layout():
    topo = Topology((0, 1, 0, 1, 1))  # strided and uneven
    assert topo.ranks_on_node(1) == (1, 3, 4)
    assert topo.local_rank(4) == 2
    assert topo.link_class(0, 2) == "intra" and topo.link_class(0, 1) == "inter"
    with pytest.raises(ValueError, match=r"different numbers of ranks: \[2, 3\]"):
        topo.ranks_per_node


@pytest.mark.parametrize("make, match", [
    (lambda: Topology.uniform(6, 4), "ranks_per_node=4 .* world_size=6"),
    (lambda: Topology.uniform(4, 0), "ranks_per_node=0"),
    (lambda: Topology(()), "at least one rank"),
    (lambda: Topology((0, 2)), "dense"),
    (lambda: Topology((0, -1)), "non-negative"),
    (lambda: Topology.uniform(4, 2).node(4), "rank 4 is out of range for world_size=4"),
    (lambda: Topology.uniform(4, 2).link_class(0, 7), "rank 7"),
    (lambda: Topology.uniform(4, 2).ranks_on_node(2), "node 2 is out of range"),
])
def test_invalid_input_names_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_detect_single_process(monkeypatch):
    for name in _DETECT_ENV:
        monkeypatch.delenv(name, raising=False)
    assert detect_topology() == Topology((0,))
    assert detect_topology(ranks_per_node=1) == Topology((0,))
    monkeypatch.setenv("MONTA_RANKS_PER_NODE", "1")
    assert detect_topology() == Topology((0,))
    monkeypatch.setenv("MONTA_RANKS_PER_NODE", "two")
    with pytest.raises(ValueError, match="MONTA_RANKS_PER_NODE must be an integer, got 'two'"):
        detect_topology()
    with pytest.raises(ValueError, match="ranks_per_node=2 .* world_size=1"):
        detect_topology(ranks_per_node=2)


def test_validate_layout_warns_once_per_message(caplog):
    topo = Topology.uniform(8, 4)
    groups = {"tp": [[0, 4], [1, 2]], "expert_tp": [[2, 5, 6]], "ep": [[0, 4]], "dp": [[3, 7]]}
    with caplog.at_level(logging.WARNING, logger="monta.topology"):
        warnings = validate_layout(topo, groups)
        assert validate_layout(topo, groups) == warnings  # returned every time ...
    assert warnings == [
        "TP group [0, 4] spans nodes 0 and 1: tensor-parallel collectives will cross the slow "
        "inter-node link",
        "Expert-TP group [2, 5, 6] spans nodes 0 and 1: expert-tensor-parallel collectives will "
        "cross the slow inter-node link",
    ]
    assert [r.getMessage() for r in caplog.records] == warnings  # ... logged once
    assert validate_layout(Topology.uniform(8, 8), groups) == []
    three = validate_layout(Topology((0, 1, 2)), {"tp": [[0, 1, 2]]})
    assert three[0].startswith("TP group [0, 1, 2] spans nodes 0, 1 and 2:")


@pytest.mark.parametrize("groups, match", [
    ({"tp": [[0, 8]]}, r"tp group \[0, 8\] has ranks \[8\] out of range for world_size=8"),
    ({"ep": [[-1, 0]]}, r"ranks \[-1\]"),
    ({"tp": [[1, 1]]}, r"tp group \[1, 1\] repeats a rank"),
    ({"dp": [[0, 1], [1, 2]]}, r"rank 1 is in two dp groups: \[0, 1\] and \[1, 2\]"),
    ({"pp": [[]]}, "empty group"),
])
def test_validate_layout_rejects_inconsistent_groups(groups, match):
    with pytest.raises(ValueError, match=match):
        validate_layout(Topology.uniform(8, 4), groups)


def _detect_cases(rank: int, world_size: int) -> dict:
    """Every detection source on 4 ranks, then megatron-core's groups (one spawn for all)."""
    for name in _DETECT_ENV:
        os.environ.pop(name, None)
    out = {"hostname": detect_topology()}  # one real host -> one node

    real_gethostname = socket.gethostname
    socket.gethostname = lambda: f"host-{'ab'[rank // 2]}"
    out["two_hosts"] = detect_topology()
    socket.gethostname = real_gethostname

    os.environ["MONTA_RANKS_PER_NODE"] = "2"
    out["env"] = detect_topology()
    out["flag_over_env"] = detect_topology(ranks_per_node=1)
    os.environ["MONTA_RANKS_PER_NODE"] = str(1 + rank % 2)
    try:
        detect_topology()
    except ValueError as e:
        out["env_disagree"] = str(e)
    del os.environ["MONTA_RANKS_PER_NODE"]

    # torchrun on 2 nodes: uneven (3 + 1 ranks), strided, and via NODE_RANK.
    os.environ.update(GROUP_RANK=str(int(rank == 3)), LOCAL_WORLD_SIZE=str(3 if rank < 3 else 1))
    out["torchrun_uneven"] = detect_topology()
    os.environ.update(GROUP_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2")
    out["torchrun_strided"] = detect_topology()
    del os.environ["GROUP_RANK"]
    os.environ["NODE_RANK"] = str(rank // 2)
    out["node_rank"] = detect_topology()
    os.environ["LOCAL_WORLD_SIZE"] = "4"
    try:
        detect_topology()
    except ValueError as e:
        out["torchrun_mismatch"] = str(e)
    for name in _DETECT_ENV:
        os.environ.pop(name, None)

    from megatron.core import parallel_state

    out["before_init"] = groups_from_parallel_state()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=2, expert_model_parallel_size=2
    )
    out["groups"] = groups_from_parallel_state()
    out["warnings"] = validate_layout(Topology.uniform(4, 1), out["groups"])
    out["warnings_2x2"] = validate_layout(Topology.uniform(4, 2), out["groups"])
    parallel_state.destroy_model_parallel()
    return out


def test_detect_topology_and_megatron_groups_on_4_ranks():
    results = run_distributed(_detect_cases, 4, timeout_s=90)
    assert all(r == results[0] for r in results)  # every rank agrees on everything
    out = results[0]
    assert out["hostname"] == Topology((0, 0, 0, 0))
    assert out["two_hosts"] == Topology((0, 0, 1, 1))
    assert out["env"] == Topology.uniform(4, 2)
    assert out["flag_over_env"] == Topology.uniform(4, 1)
    assert "ranks disagree on MONTA_RANKS_PER_NODE: ['1', '2', '1', '2']" in out["env_disagree"]
    assert out["torchrun_uneven"] == Topology((0, 0, 0, 1))
    assert out["torchrun_strided"] == Topology((0, 1, 0, 1))
    assert out["node_rank"] == Topology((0, 0, 1, 1))
    assert out["torchrun_mismatch"] == (
        "rank 0 has LOCAL_WORLD_SIZE=4 but 2 ranks share its GROUP_RANK=0 "
        "(GROUP_RANK by rank: [0, 0, 1, 1])"
    )
    assert out["before_init"] == {}
    groups = out["groups"]
    assert groups["tp"] == [[0, 1], [2, 3]]
    assert groups["dp"] == [[0, 2], [1, 3]]
    assert groups["pp"] == [[0], [1], [2], [3]]
    assert groups["ep"] == [[0, 2], [1, 3]]
    assert groups["expert_tp"] == [[0, 1], [2, 3]]  # expert-TP defaults to TP
    assert out["warnings"] == [
        f"{label} group {pair} spans nodes {a} and {b}: {adjective} collectives will cross the "
        f"slow inter-node link"
        for label, adjective in (("TP", "tensor-parallel"), ("Expert-TP", "expert-tensor-parallel"))
        for pair, a, b in (([0, 1], 0, 1), ([2, 3], 2, 3))
    ]
    assert out["warnings_2x2"] == []
