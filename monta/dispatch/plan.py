"""Who sends which token where: pure index arithmetic on one rank, no communication.

Legend: T tokens on this rank, E experts, R ranks in the EP group, N nodes they span,
rows = (token, destination) copies. A routing *row* carries the token's hidden state plus
its probabilities/mask restricted to the experts that live at the destination.

Two shapes of dispatch:

* flat: one copy per (token, destination rank) — megatron's all-to-all, but a token that picked
  several experts on one rank crosses once, not once per expert;
* node-deduplicated: one copy per (token, remote node), sent to a *gateway* on that node (the
  rank owning the token's lowest-numbered expert there, so the copy is useful where it lands),
  then fanned out inside the node to the other owners.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ExpertLayout:
    """Where experts live, in EP-group ranks and nodes.

    Attributes:
        owner_of_expert: [E] int64, EP-group rank holding each expert.
        node_of_rank: [R] int64, node of each EP-group rank.
        my_rank: this rank's index in the EP group.
    """

    owner_of_expert: torch.Tensor
    node_of_rank: torch.Tensor
    my_rank: int

    @staticmethod
    def contiguous(num_experts: int, node_of_rank: list[int], my_rank: int) -> "ExpertLayout":
        """megatron's placement: rank r holds experts [r·E/R, (r+1)·E/R)."""
        ranks = len(node_of_rank)
        if num_experts % ranks:
            raise ValueError(f"{num_experts} experts do not split over {ranks} EP ranks")
        owner = torch.arange(num_experts) // (num_experts // ranks)
        return ExpertLayout(owner, torch.tensor(node_of_rank, dtype=torch.int64), my_rank)

    def on(self, device) -> "ExpertLayout":
        """The same layout with its tensors on ``device`` (the routing map's)."""
        if self.owner_of_expert.device == torch.device(device):
            return self
        return ExpertLayout(self.owner_of_expert.to(device), self.node_of_rank.to(device),
                            self.my_rank)

    @property
    def num_ranks(self) -> int:
        return self.node_of_rank.numel()

    @property
    def num_nodes(self) -> int:
        return int(self.node_of_rank.max().item()) + 1

    @property
    def my_node(self) -> int:
        return int(self.node_of_rank[self.my_rank].item())

    @property
    def expert_node(self) -> torch.Tensor:
        return self.node_of_rank[self.owner_of_expert]


@dataclass(frozen=True)
class SendPlan:
    """Rows to build from local rows, grouped by destination for an all-to-all.

    Attributes:
        source_rows: [n] int64, index of the local row each outgoing row copies (in send order).
        masks: [n, E] bool, the experts the outgoing row serves at its destination.
        splits: per-destination row counts (python ints, length R); splits[my_rank] == 0.
        kept_rows: [k] int64, local rows that stay here (this rank owns some of their experts).
        kept_masks: [k, E] bool, the experts they serve here.
        columns: [n, W] int64, the W experts the destination of each outgoing row can serve:
            only those routing columns travel (W = E/R to an owner, E/N to a gateway).
        recv_columns: [W] int64, the columns of the rows this rank receives.
    """

    source_rows: torch.Tensor
    masks: torch.Tensor
    splits: list[int]
    kept_rows: torch.Tensor
    kept_masks: torch.Tensor
    columns: torch.Tensor
    recv_columns: torch.Tensor

    def compact(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing metadata of the outgoing rows, restricted to their destinations' experts.

        Args:
            probs: [rows, E], the local rows' router probabilities.
        Returns:
            ([n, W] probabilities (zero where not routed), [n, W] uint8 mask).
        """
        masks = torch.gather(self.masks, 1, self.columns)
        sent = torch.gather(probs[self.source_rows], 1, self.columns) * masks
        return sent, masks.to(torch.uint8)

    def expand(self, probs: torch.Tensor, mask: torch.Tensor,
               num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Received [m, W] metadata back to dense [m, E] (differentiable in ``probs``)."""
        dense_probs = probs.new_zeros(probs.size(0), num_experts).index_add(
            1, self.recv_columns, probs)
        dense_mask = mask.new_zeros(mask.size(0), num_experts, dtype=torch.bool)
        dense_mask[:, self.recv_columns] = mask.bool()
        return dense_probs, dense_mask


def _group_by_destination(rows: torch.Tensor, dest: torch.Tensor, masks: torch.Tensor,
                          num_ranks: int):
    order = torch.argsort(dest, stable=True)
    splits = torch.bincount(dest, minlength=num_ranks).tolist()
    return rows[order], masks[order], splits, order


def _experts_of(group_of_expert: torch.Tensor, num_groups: int) -> torch.Tensor | None:
    """[groups, W] expert ids per rank (or node), or None when the groups differ in size."""
    members = [torch.nonzero(group_of_expert == g).flatten() for g in range(num_groups)]
    if len({m.numel() for m in members}) != 1:
        return None
    return torch.stack(members)


def plan_to_owners(mask: torch.Tensor, layout: ExpertLayout,
                   only_node: int | None = None) -> SendPlan:
    """One copy of each row per owner rank of its experts (optionally only owners on one node).

    Args:
        mask: [rows, E] bool, the experts each local row must reach.
        layout: expert placement.
        only_node: restrict to owners on this node (the intra-node fan-out), else all owners.
    """
    layout = layout.on(mask.device)
    rank_of_expert = torch.nn.functional.one_hot(layout.owner_of_expert, layout.num_ranks).bool()
    wants_rank = (mask.unsqueeze(-1) & rank_of_expert.unsqueeze(0)).any(dim=1)  # [rows, R]
    if only_node is not None:
        wants_rank &= (layout.node_of_rank == only_node).unsqueeze(0)
    # [rows, R, E] -> the experts of row i that rank r owns
    masks_per_rank = mask.unsqueeze(1) & rank_of_expert.t().unsqueeze(0)
    keep = wants_rank[:, layout.my_rank]
    kept_rows = torch.nonzero(keep).flatten()
    wants_rank[:, layout.my_rank] = False
    rows, ranks = torch.nonzero(wants_rank, as_tuple=True)
    source_rows, masks, splits, order = _group_by_destination(
        rows, ranks, masks_per_rank[rows, ranks], layout.num_ranks)
    experts_of_rank = _experts_of(layout.owner_of_expert, layout.num_ranks)  # [R, E/R]
    return SendPlan(source_rows, masks, splits, kept_rows,
                    masks_per_rank[kept_rows, layout.my_rank],
                    experts_of_rank[ranks[order]], experts_of_rank[layout.my_rank])


def plan_to_gateways(mask: torch.Tensor, layout: ExpertLayout) -> SendPlan:
    """One copy of each token per *remote* node it needs, to that node's gateway rank.

    ``kept_rows`` are the tokens that need experts on this rank's own node (served by the
    intra-node fan-out that follows); their ``kept_masks`` cover only those experts.
    """
    layout = layout.on(mask.device)
    expert_node = layout.expert_node
    node_of_expert = torch.nn.functional.one_hot(expert_node, layout.num_nodes).bool()  # [E, N]
    masks_per_node = mask.unsqueeze(1) & node_of_expert.t().unsqueeze(0)  # [T, N, E]
    needs_node = masks_per_node.any(dim=-1)  # [T, N]
    my_node = layout.my_node
    kept_rows = torch.nonzero(needs_node[:, my_node]).flatten()
    needs_node[:, my_node] = False
    rows, nodes = torch.nonzero(needs_node, as_tuple=True)
    node_masks = masks_per_node[rows, nodes]
    # gateway: owner of the lowest-numbered expert the token wants on that node
    first_expert = node_masks.to(torch.int8).argmax(dim=-1)
    gateways = layout.owner_of_expert[first_expert]
    source_rows, masks, splits, order = _group_by_destination(rows, gateways, node_masks,
                                                              layout.num_ranks)
    experts_of_node = _experts_of(expert_node, layout.num_nodes)  # [N, E/N]
    if experts_of_node is None:  # nodes hold different numbers of experts: send every column
        every = torch.arange(mask.size(1), device=mask.device)
        columns, recv_columns = every.expand(source_rows.numel(), -1), every
    else:
        columns, recv_columns = experts_of_node[nodes[order]], experts_of_node[my_node]
    return SendPlan(source_rows, masks, splits, kept_rows, masks_per_node[kept_rows, my_node],
                    columns, recv_columns)


def only_columns(probs: torch.Tensor, mask: torch.Tensor, columns: list[int]):
    """[rows, E] routing restricted to ``columns`` ([rows, W] probs, [rows, W] uint8 mask):
    what travels in the expert-TP all-gather, whose rows only use this EP rank's experts."""
    index = torch.tensor(columns, device=probs.device)
    return probs[:, index], mask[:, index].to(torch.uint8)


def all_columns(probs: torch.Tensor, mask: torch.Tensor, columns: list[int], num_experts: int):
    """Inverse of :func:`only_columns` (differentiable in ``probs``)."""
    index = torch.tensor(columns, device=probs.device)
    dense_probs = probs.new_zeros(probs.size(0), num_experts).index_add(1, index, probs)
    dense_mask = torch.zeros(mask.size(0), num_experts, dtype=torch.bool, device=mask.device)
    dense_mask[:, index] = mask.bool()
    return dense_probs, dense_mask


@dataclass(frozen=True)
class ExpertOrder:
    """Rows at the experts, sorted by local expert as megatron's experts module expects.

    Attributes:
        rows: [n] int64, which received row each expert input copies.
        experts: [n] int64, the global expert id of each copy.
        tokens_per_expert: [num_local_experts] int64, copies per local expert, on the rows'
            device: the grouped experts use them there; ``SequentialMLP`` copies them to the
            host itself (``.tolist()``).
    """

    rows: torch.Tensor
    experts: torch.Tensor
    tokens_per_expert: torch.Tensor
    inverse: torch.Tensor | None = None
    """[rows·topk] int64, only from :func:`order_by_expert_topk`: the position of copy
    ``t·topk + j`` (row t's j-th expert) in the expert order (see monta/dispatch/permute.py)."""
    topk: int | None = None
    flat: torch.Tensor | None = None
    """[n] int64, only from :func:`order_by_expert_topk`: ``rows·E + experts``, each copy's
    entry of the flattened [rows, E] probabilities (one gather, see permute.GatherFlat); from
    :func:`order_of_choices`: the copy ``t·k + j`` itself."""


def order_by_local_expert(mask: torch.Tensor, local_experts: list[int]) -> ExpertOrder:
    """One copy per (row, selected local expert), grouped by expert in ascending order.

    ``nonzero`` sizes its output from the data, so this waits for the GPU (a host sync); see
    :func:`order_by_expert_topk` for the sync-free case.
    """
    local = mask[:, local_experts]  # [rows, L]
    experts_idx, rows = torch.nonzero(local.t(), as_tuple=True)  # expert-major order
    experts = torch.tensor(local_experts, dtype=torch.int64, device=mask.device)[experts_idx]
    counts = local.sum(dim=0, dtype=torch.int64)
    return ExpertOrder(rows, experts, counts)


def order_by_expert_topk(mask: torch.Tensor, topk: int, use_kernel: bool = True) -> ExpertOrder:
    """:func:`order_by_local_expert` for a rank that holds *all* experts and rows that each
    selected exactly ``topk`` of them (dropless top-k routing), without a host sync.

    The output has exactly rows·topk copies, a size the host knows, so every step is a
    fixed-size kernel. On a GPU with Triton that is one kernel (:mod:`.kernels`: the torch
    version below is ~15 launches, each a host round of ~40 µs before the first expert GEMM
    can start); elsewhere top-k over the mask finds each row's experts and a stable sort by
    expert groups the copies. Either way rows ascend within an expert, as ``nonzero`` orders
    them; the order of a row's own copies (j in ``t·topk + j``) is the kernel's ascending
    expert id, topk's tie order here — only summed over, so it does not matter.

    A row with fewer than ``topk`` selected experts (not produced by megatron's dropless
    router) gets extra copies to unselected experts; their probabilities are 0, so they
    add nothing to the output and no gradient — they only cost compute.
    """
    num_experts = mask.size(1)
    if use_kernel:
        from monta.dispatch import kernels

        if kernels.available(mask):
            rows, experts, flat, inverse, counts = kernels.expert_order(mask, topk)
            return ExpertOrder(rows, experts, counts, inverse, topk, flat)
    chosen = torch.topk(mask.to(torch.int8), topk, dim=1).indices  # [rows, k]
    order = order_of_choices(chosen, num_experts)
    return replace(order, flat=order.rows * num_experts + order.experts)


def order_of_choices(chosen: torch.Tensor, num_experts: int) -> ExpertOrder:
    """The expert order of top-k choices ``chosen`` [rows, k] (expert ids): a stable sort of
    the copies by expert, so rows ascend within an expert. ``flat`` is each copy's index
    ``t·k + j`` into ``chosen.reshape(-1)``."""
    topk = chosen.size(1)
    chosen = chosen.reshape(-1)  # [rows·k]
    order = torch.argsort(chosen, stable=True)
    rows = torch.div(order, topk, rounding_mode="floor")
    experts = chosen[order]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=chosen.device)
    counts.index_add_(0, chosen, torch.ones_like(chosen))
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(),
                                                                      device=order.device))
    return ExpertOrder(rows, experts, counts, inverse, topk, order)
