"""Which ranks share a node, and what kind of link joins any two ranks.

A :class:`Topology` maps every global rank to a node id. Everything network-aware in MoNTA (the byte
counters in :mod:`monta.comm`, the dispatcher's node de-duplication, the planner) asks it one
question: is the link between rank ``src`` and rank ``dst`` ``"self"``, ``"intra"`` (same node:
NVLink, or loopback on the CPU testbed) or ``"inter"`` (different nodes: the NIC)?

:func:`detect_topology` finds the node of every rank of a running job, trying in order:

  1) the ``ranks_per_node`` argument (the ``--ranks-per-node`` flag): nodes are consecutive blocks
     of that many ranks. This is how one host *emulates* several nodes;
  2) the environment variable ``MONTA_RANKS_PER_NODE`` (same meaning);
  3) torchrun's environment: ``LOCAL_WORLD_SIZE`` plus ``GROUP_RANK`` (or ``NODE_RANK``); every
     rank's node id is gathered, since nodes may hold different numbers of ranks;
  4) host names (``socket.gethostname()``), gathered from every rank;
  5) a single node.

This module imports torch only inside the functions that talk to a running job, so the
:class:`Topology` class itself stays pure Python (the planner uses it without torch.distributed).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

LinkClass = Literal["self", "intra", "inter"]

# Group names whose collectives sit on the critical path of every layer and should stay inside
# a node; the value completes the warning text.
_NODE_LOCAL_GROUPS = {
    "tp": ("TP", "tensor-parallel"),
    "expert_tp": ("Expert-TP", "expert-tensor-parallel"),
}
_ENV_RANKS_PER_NODE = "MONTA_RANKS_PER_NODE"
_WARNED: set[str] = set()  # warnings already logged by validate_layout (each one once)


@dataclass(frozen=True)
class Topology:
    """Node membership of every global rank.

    Attributes:
        node_of_rank: ``node_of_rank[r]`` is the node id of global rank ``r``. Node ids are dense:
            every id in ``range(num_nodes)`` holds at least one rank. Ranks of a node need not be
            consecutive (``(0, 1, 0, 1)`` is a valid two-node layout).
    """

    node_of_rank: tuple[int, ...]

    def __post_init__(self) -> None:
        nodes = self.node_of_rank
        if not isinstance(nodes, tuple):
            object.__setattr__(self, "node_of_rank", tuple(nodes))
            nodes = self.node_of_rank
        if not nodes:
            raise ValueError("Topology needs at least one rank, got node_of_rank=()")
        if any(not isinstance(n, int) or n < 0 for n in nodes):
            raise ValueError(f"node ids must be non-negative ints, got node_of_rank={nodes}")
        if set(nodes) != set(range(max(nodes) + 1)):
            raise ValueError(
                f"node ids must be dense (each of 0..{max(nodes)} used), got node_of_rank={nodes}"
            )

    @classmethod
    def uniform(cls, world_size: int, ranks_per_node: int) -> Topology:
        """Nodes of ``ranks_per_node`` consecutive ranks (rank r on node r // ranks_per_node)."""
        if world_size < 1 or ranks_per_node < 1 or world_size % ranks_per_node != 0:
            raise ValueError(
                f"ranks_per_node={ranks_per_node} must be >= 1 and divide world_size={world_size}"
            )
        return cls(tuple(r // ranks_per_node for r in range(world_size)))

    @property
    def world_size(self) -> int:
        return len(self.node_of_rank)

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_rank) + 1

    @property
    def ranks_per_node(self) -> int:
        """Ranks on every node; ValueError when nodes hold different numbers of ranks."""
        counts = [len(self.ranks_on_node(n)) for n in range(self.num_nodes)]
        if len(set(counts)) != 1:
            raise ValueError(f"nodes hold different numbers of ranks: {counts} (node 0, 1, ...)")
        return counts[0]

    def node(self, rank: int) -> int:
        self._check_rank(rank)
        return self.node_of_rank[rank]

    def ranks_on_node(self, node: int) -> tuple[int, ...]:
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node {node} is out of range for {self.num_nodes} nodes")
        return tuple(r for r, n in enumerate(self.node_of_rank) if n == node)

    def local_rank(self, rank: int) -> int:
        """Index of ``rank`` among the ranks of its node (ascending global rank order)."""
        return self.ranks_on_node(self.node(rank)).index(rank)

    def link_class(self, src: int, dst: int) -> LinkClass:
        """``"self"`` if ``src == dst``, ``"intra"`` on the same node, ``"inter"`` otherwise."""
        if src == dst:
            self._check_rank(src)
            return "self"
        return "intra" if self.node(src) == self.node(dst) else "inter"

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is out of range for world_size={self.world_size}")

    def __str__(self) -> str:
        counts = [len(self.ranks_on_node(n)) for n in range(self.num_nodes)]
        per_node = f"{counts[0]}" if len(set(counts)) == 1 else "/".join(map(str, counts))
        return f"{self.num_nodes} node(s) x {per_node} rank(s) (node_of_rank={self.node_of_rank})"


def _rank_facts() -> dict[str, Any]:
    """What this rank knows about its node, gathered by :func:`detect_topology`."""
    env = os.environ
    return {
        "env_ranks_per_node": env.get(_ENV_RANKS_PER_NODE),
        "local_world_size": env.get("LOCAL_WORLD_SIZE"),
        "group_rank": env.get("GROUP_RANK", env.get("NODE_RANK")),
        "hostname": socket.gethostname(),
    }


def _dense_ids(keys: list[Any]) -> tuple[int, ...]:
    """Node ids 0, 1, ... in order of first appearance (by rank) of each distinct key."""
    ids: dict[Any, int] = {}
    return tuple(ids.setdefault(k, len(ids)) for k in keys)


def _parse_int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def detect_topology(ranks_per_node: int | None = None, group: Any = None) -> Topology:
    """The node of every rank of this job (see the module docstring for the order of sources).

    Every rank must call this (it gathers one small object per rank unless ``ranks_per_node`` is
    given). Without an initialised torch.distributed the world is this one process.

    Args:
        ranks_per_node: the ``--ranks-per-node`` flag; wins over everything else.
        group: process group for the gather; default the world. It must hold every rank (with an
            NCCL default group, pass a gloo group to keep the gather off the GPU).

    Returns:
        The topology of all ``world_size`` ranks; the same on every rank.

    Raises:
        ValueError: ranks disagree on ``MONTA_RANKS_PER_NODE``, torchrun's ``LOCAL_WORLD_SIZE``
            contradicts the gathered node sizes, or a ranks-per-node value does not divide the
            world size.
    """
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialized else 1
    if ranks_per_node is not None:
        return _chosen(Topology.uniform(world_size, ranks_per_node), "--ranks-per-node")

    facts = [_rank_facts()]
    if initialized and world_size > 1:
        if group is not None and dist.get_world_size(group) != world_size:
            raise ValueError(
                f"detect_topology needs a group of all {world_size} ranks, got one of "
                f"{dist.get_world_size(group)}"
            )
        facts = [None] * world_size
        dist.all_gather_object(facts, _rank_facts(), group=group)

    env_values = [f["env_ranks_per_node"] for f in facts]
    if any(v is not None for v in env_values):
        if len(set(env_values)) != 1:
            raise ValueError(f"ranks disagree on {_ENV_RANKS_PER_NODE}: {env_values} (by rank)")
        value = _parse_int(env_values[0], _ENV_RANKS_PER_NODE)
        return _chosen(Topology.uniform(world_size, value), _ENV_RANKS_PER_NODE)

    if all(f["group_rank"] is not None and f["local_world_size"] is not None for f in facts):
        group_ranks = [_parse_int(f["group_rank"], "GROUP_RANK/NODE_RANK") for f in facts]
        topology = Topology(_dense_ids(group_ranks))
        for rank, f in enumerate(facts):
            expected = _parse_int(f["local_world_size"], "LOCAL_WORLD_SIZE")
            actual = len(topology.ranks_on_node(topology.node(rank)))
            if expected != actual:
                raise ValueError(
                    f"rank {rank} has LOCAL_WORLD_SIZE={expected} but {actual} ranks share its "
                    f"GROUP_RANK={group_ranks[rank]} (GROUP_RANK by rank: {group_ranks})"
                )
        return _chosen(topology, "torchrun GROUP_RANK")

    if len(facts) > 1:
        return _chosen(Topology(_dense_ids([f["hostname"] for f in facts])), "host names")
    return _chosen(Topology((0,)), "single process")


def _chosen(topology: Topology, source: str) -> Topology:
    logger.info("topology from %s: %s", source, topology)
    return topology


def validate_layout(topology: Topology, groups: dict[str, list[list[int]]]) -> list[str]:
    """Check process groups against the topology.

    Args:
        topology: node membership of every rank.
        groups: group name -> list of groups (each a list of global ranks), e.g. the output of
            :func:`groups_from_parallel_state`. Names ``"tp"`` and ``"expert_tp"`` are checked
            for spanning nodes; every name is checked for consistency.

    Returns:
        Warnings, one per node-spanning TP / expert-TP group; each is also logged (once per
        process).

    Raises:
        ValueError: a rank out of range for the topology, an empty group, a rank repeated inside
            one group, or a rank in two groups of the same name.
    """
    warnings: list[str] = []
    for name, name_groups in groups.items():
        owner: dict[int, list[int]] = {}
        for ranks in name_groups:
            ranks = list(ranks)
            if not ranks:
                raise ValueError(f"{name} has an empty group: {name_groups}")
            bad = [r for r in ranks if not 0 <= r < topology.world_size]
            if bad:
                raise ValueError(
                    f"{name} group {ranks} has ranks {bad} out of range for "
                    f"world_size={topology.world_size}"
                )
            if len(set(ranks)) != len(ranks):
                raise ValueError(f"{name} group {ranks} repeats a rank")
            for r in ranks:
                if r in owner:
                    raise ValueError(f"rank {r} is in two {name} groups: {owner[r]} and {ranks}")
                owner[r] = ranks
            nodes = sorted({topology.node(r) for r in ranks})
            if name in _NODE_LOCAL_GROUPS and len(nodes) > 1:
                label, adjective = _NODE_LOCAL_GROUPS[name]
                spans = ", ".join(map(str, nodes[:-1])) + f" and {nodes[-1]}"
                warnings.append(
                    f"{label} group {ranks} spans nodes {spans}: {adjective} collectives will "
                    f"cross the slow inter-node link"
                )
    for message in warnings:
        if message not in _WARNED:
            _WARNED.add(message)
            logger.warning(message)
    return warnings


def groups_from_parallel_state() -> dict[str, list[list[int]]]:
    """Every rank list of megatron-core's tp, ep, expert_tp, pp and dp groups.

    Each rank knows only its own group of each kind, so the members are gathered from every rank
    (one ``all_gather_object``; every rank must call this). Returns ``{}`` when
    ``parallel_state`` is not initialised; a kind whose group does not exist is left out.

    Returns:
        name -> groups, each group a list of global ranks, groups sorted by their first rank.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    getters = {
        "tp": lambda: ps.get_tensor_model_parallel_group(check_initialized=False),
        "ep": lambda: ps.get_expert_model_parallel_group(check_initialized=False),
        "expert_tp": lambda: ps.get_expert_tensor_parallel_group(check_initialized=False),
        "pp": lambda: ps.get_pipeline_model_parallel_group(check_initialized=False),
        "dp": lambda: ps.get_data_parallel_group(),
    }
    mine: dict[str, list[list[int]]] = {}
    for name, getter in getters.items():
        group = getter()
        if group is None:
            continue
        # pp may be a list of groups (several pipeline layouts); keep each.
        mine[name] = [dist.get_process_group_ranks(g) for g in
                      (group if isinstance(group, list) else [group])]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    result: dict[str, list[list[int]]] = {}
    for name in getters:
        unique = {tuple(ranks) for per_rank in gathered for ranks in per_rank.get(name, [])}
        if unique:
            result[name] = [list(ranks) for ranks in sorted(unique)]
    return result
