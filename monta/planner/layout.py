"""A parallel layout (TP, PP, EP, ETP; DP derived), megatron-core's rank grid, and validity.

megatron-core 0.16.1 builds its groups with order ``tp-cp-ep-dp-pp`` (TP fastest): in the
attention grid rank = tp_i + TP·(dp_i + DP·pp_i); in the expert grid
rank = etp_i + ETP·(ep_i + EP·(edp_i + EDP·pp_i)). So a TP group is TP consecutive ranks, an EP
group is EP ranks ETP apart, and a PP stage is a block of world/PP consecutive ranks. Nodes are
blocks of G consecutive ranks (torchrun's default placement).
"""

from __future__ import annotations

from dataclasses import dataclass

from monta.planner.model import ModelSpec, Workload


@dataclass(frozen=True)
class Layout:
    """Degrees of parallelism on a world of ``world`` ranks, ``ranks_per_node`` per node."""

    world: int
    """Ranks in the job."""
    ranks_per_node: int
    """G."""
    tp: int = 1
    """Tensor parallel (with sequence parallelism when > 1)."""
    pp: int = 1
    """Pipeline stages."""
    ep: int = 1
    """Expert parallel."""
    etp: int = 1
    """Expert tensor parallel."""

    @property
    def dp(self) -> int:
        """Data parallel of the attention grid: world / (TP · PP)."""
        return self.world // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        """Expert data parallel: world / (ETP · EP · PP)."""
        return self.world // (self.etp * self.ep * self.pp)

    @property
    def stage_size(self) -> int:
        return self.world // self.pp

    @property
    def nodes(self) -> int:
        return max(1, self.world // self.ranks_per_node)

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def ep_groups(self) -> list[list[int]]:
        """Every EP group (global ranks, in EP-index order: index i holds experts
        [i·E/EP, (i+1)·E/EP))."""
        groups = []
        for stage in range(self.pp):
            base = stage * self.stage_size
            for edp_i in range(self.edp):
                for etp_i in range(self.etp):
                    start = base + etp_i + self.etp * self.ep * edp_i
                    groups.append([start + self.etp * i for i in range(self.ep)])
        return groups

    def dp_group(self) -> list[int]:
        """The DP group of rank 0 (ranks TP apart inside stage 0)."""
        return [self.tp * i for i in range(self.dp)]

    def edp_group(self) -> list[int]:
        """The expert-DP group of rank 0 (ranks ETP·EP apart inside stage 0)."""
        return [self.etp * self.ep * i for i in range(self.edp)]

    def members_per_node(self, group: list[int]) -> int:
        """Most members of ``group`` on one node."""
        counts: dict[int, int] = {}
        for rank in group:
            counts[self.node(rank)] = counts.get(self.node(rank), 0) + 1
        return max(counts.values())

    def spans_nodes(self, group: list[int]) -> bool:
        return len({self.node(r) for r in group}) > 1

    def __str__(self) -> str:
        return (f"TP{self.tp}·PP{self.pp}·EP{self.ep}·ETP{self.etp}·DP{self.dp}"
                f"{'' if self.edp == self.dp else f'·EDP{self.edp}'}")


def layout_problems(layout: Layout, model: ModelSpec, workload: Workload) -> list[str]:
    """Why a layout cannot run (empty when it can): the divisibility rules of
    ``monta/training/validation.py`` plus TP and expert-TP inside a node (the two are held to
    agree by ``tests/planner/test_layout_rules.py``)."""
    w, g = layout.world, layout.ranks_per_node
    tp, pp, ep, etp = layout.tp, layout.pp, layout.ep, layout.etp
    problems = []
    if min(tp, pp, ep, etp) < 1:
        return [f"degrees must be >= 1, got TP{tp} PP{pp} EP{ep} ETP{etp}"]
    if w % (tp * pp):
        problems.append(f"world {w} not divisible by TP·PP = {tp * pp}")
    if w % (etp * ep * pp):
        problems.append(f"world {w} not divisible by ETP·EP·PP = {etp * ep * pp}")
    if g % tp:
        problems.append(f"TP {tp} does not fit inside a node of {g} ranks")
    if g % etp:
        problems.append(f"ETP {etp} does not fit inside a node of {g} ranks")
    if model.num_attention_heads % tp:
        problems.append(f"heads {model.num_attention_heads} not divisible by TP {tp}")
    if model.num_query_groups % tp:
        problems.append(f"query groups {model.num_query_groups} not divisible by TP {tp}")
    if model.num_layers % pp:
        problems.append(f"layers {model.num_layers} not divisible by PP {pp}")
    if model.num_experts % ep:
        problems.append(f"experts {model.num_experts} not divisible by EP {ep}")
    if model.ffn_hidden_size % etp:
        problems.append(f"ffn {model.ffn_hidden_size} not divisible by ETP {etp}")
    if workload.seq_length % tp:
        problems.append(f"seq-length {workload.seq_length} not divisible by TP {tp} "
                        f"(sequence parallel)")
    if not problems:
        gbs, mbs = workload.global_batch(w), workload.micro_batch_size
        if gbs % (mbs * layout.dp):
            problems.append(f"global batch {gbs} not divisible by micro batch {mbs} × DP "
                            f"{layout.dp}")
    return problems
