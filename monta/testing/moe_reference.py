"""A dense, single-process reference of megatron-core's MoE layer (router + SwiGLU experts).

It reproduces what megatron-core 0.16.1's ``MoELayer`` computes with the ``TopKRouter`` (softmax
score function applied after top-k, no aux loss, no expert bias) and ``SequentialMLP`` experts
(gated linear unit with SiLU, no biases), without any parallelism, with autograd, so a test can
compare the distributed layer's output and the gradients of its input and of every weight.

Shape legend:
    E: experts, H: hidden, F: expert FFN hidden (per half of the gated fc1), k: top-k,
    T: tokens of one routing shard (what one rank's router sees: its SP/DP slice, flattened).

Semantics copied from megatron-core (``moe_utils.topk_routing_with_score_function`` and
``apply_router_token_dropping``):
  1) logits = x @ W_router.T; top-k by logit; probs = softmax over the k selected logits (or,
     with ``pre_softmax``, softmax over all E logits, then top-k of those).
  2) Capacity is per routing shard, i.e. per rank: C = ceil(T·k/E · capacity_factor). If C > T
     nothing is dropped. Else each expert keeps the C (token, expert) pairs with the largest prob
     among the shard's T tokens (``"probs"`` policy) or the first C routed tokens (``"position"``).
     Kept probs are *not* renormalised. Padding to capacity adds zero-prob rows, which change
     neither outputs nor gradients, so the reference ignores ``pad_to_capacity``.
  3) expert e: y = (prob · silu(x W_gate.T) ⊙ (x W_up.T)) @ W_fc2.T, where linear_fc1's weight
     stacks ``[W_gate; W_up]`` along its output dim. The layer output sums y over kept experts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class MoEWeights:
    """Full (unsharded) weights of one MoE layer, or their gradients.

    Attributes:
        router: ``[E, H]``, the router's gate weight.
        fc1: ``[E, 2F, H]``, each expert's ``linear_fc1.weight``: rows ``[:F]`` gate, ``[F:]`` up.
        fc2: ``[E, H, F]``, each expert's ``linear_fc2.weight``.
    """

    router: torch.Tensor
    fc1: torch.Tensor
    fc2: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    @property
    def ffn_hidden_size(self) -> int:
        return self.fc2.shape[2]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"router": self.router, "fc1": self.fc1, "fc2": self.fc2}

    def detached_leaves(self) -> "MoEWeights":
        """Fresh leaf copies that require grad (the reference's own parameters)."""
        return MoEWeights(
            **{n: t.detach().clone().requires_grad_(True) for n, t in self.tensors().items()}
        )

    def grads(self) -> "MoEWeights":
        """The ``.grad`` of each tensor (zeros where autograd left none)."""
        return MoEWeights(
            **{
                n: t.grad if t.grad is not None else torch.zeros_like(t)
                for n, t in self.tensors().items()
            }
        )


def random_moe_weights(
    num_experts: int,
    hidden_size: int,
    ffn_hidden_size: int,
    seed: int,
    hot_experts: Sequence[int] = (),
    hot_direction: torch.Tensor | None = None,
) -> MoEWeights:
    """Deterministic random weights; every rank can rebuild the same full tensors from ``seed``.

    Args:
        hot_experts: experts made to win top-k for tokens with a positive component along
            ``hot_direction`` (a unit vector ``[H]``): their router rows become
            ``(3 + 0.5·j) · hot_direction`` (``j`` = position in ``hot_experts``) plus small noise
            orthogonal to it, and every other row is made orthogonal to ``hot_direction``.
    """
    gen = torch.Generator().manual_seed(seed)
    router = torch.randn(num_experts, hidden_size, generator=gen) / math.sqrt(hidden_size)
    fc1 = torch.randn(num_experts, 2 * ffn_hidden_size, hidden_size, generator=gen)
    fc1 /= math.sqrt(hidden_size)
    fc2 = torch.randn(num_experts, hidden_size, ffn_hidden_size, generator=gen)
    fc2 /= math.sqrt(ffn_hidden_size)
    if hot_experts:
        if hot_direction is None:
            raise ValueError("hot_experts needs hot_direction")
        u = hot_direction / hot_direction.norm()
        router = router - torch.outer(router @ u, u)  # [E, H]: no component along u
        for j, e in enumerate(hot_experts):
            router[e] = 0.1 * router[e] + (3.0 + 0.5 * j) * u
    return MoEWeights(router=router, fc1=fc1, fc2=fc2)


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """The router settings the reference supports (megatron field names in parentheses)."""

    topk: int
    """(moe_router_topk)"""
    capacity_factor: float | None = None
    """(moe_expert_capacity_factor) None: dropless."""
    drop_policy: Literal["probs", "position"] = "probs"
    """(moe_token_drop_policy)"""
    pre_softmax: bool = False
    """(moe_router_pre_softmax) softmax over all E logits, then top-k of those probs."""


@dataclasses.dataclass
class ShardRouting:
    """Routing of one shard of T tokens.

    Attributes:
        probs: ``[T, E]`` combine weights after dropping (zero where not kept); has grad.
        routed: ``[T, E]`` bool, the top-k choice before dropping.
        kept: ``[T, E]`` bool, after dropping.
        capacity: per-expert capacity of this shard, or None when dropless.
    """

    probs: torch.Tensor
    routed: torch.Tensor
    kept: torch.Tensor
    capacity: int | None


def capacity_per_shard(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """Megatron's ``get_capacity(num_tokens·k, E, cf)`` = ``ceil(T·k/E · cf)``."""
    return math.ceil((num_tokens * topk / num_experts) * capacity_factor)


def route_shard(x: torch.Tensor, router: torch.Tensor, cfg: RoutingConfig) -> ShardRouting:
    """Top-k softmax routing with optional capacity dropping, for one shard.

    Args:
        x: ``[T, H]`` tokens of one routing shard.
        router: ``[E, H]`` router weight.
    """
    num_tokens, num_experts = x.shape[0], router.shape[0]
    logits = torch.mm(x, router.t())  # [T, E]
    if cfg.pre_softmax:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_probs, top_idx = torch.topk(scores, k=cfg.topk, dim=1)  # [T, k]
    else:
        top_logits, top_idx = torch.topk(logits, k=cfg.topk, dim=1)  # [T, k]
        top_probs = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
    probs = torch.zeros_like(logits).scatter(1, top_idx, top_probs)  # [T, E]
    routed = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top_idx, 1).bool()
    if cfg.capacity_factor is None:
        return ShardRouting(probs=probs, routed=routed, kept=routed, capacity=None)

    capacity = capacity_per_shard(num_tokens, num_experts, cfg.topk, cfg.capacity_factor)
    if capacity > num_tokens:
        keep = torch.ones_like(routed)
    else:
        score = probs if cfg.drop_policy == "probs" else routed.int()
        _, keep_idx = torch.topk(score, k=capacity, dim=0, sorted=False)  # [C, E]
        keep = torch.zeros_like(probs).scatter(0, keep_idx, 1).bool()
    kept = routed & keep
    return ShardRouting(probs=probs * kept, routed=routed, kept=kept, capacity=capacity)


def swiglu_expert(x: torch.Tensor, prob: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor):
    """One expert on its tokens, prob applied before fc2 (as megatron's MLP does).

    Args:
        x: ``[n, H]``; prob: ``[n]``; fc1: ``[2F, H]`` (gate rows then up rows); fc2: ``[H, F]``.

    Returns:
        ``[n, H]``.
    """
    gate, up = torch.chunk(torch.mm(x, fc1.t()), 2, dim=-1)  # [n, F] each
    return torch.mm(F.silu(gate) * up * prob.unsqueeze(-1), fc2.t())


@dataclasses.dataclass
class ReferenceResult:
    """Outputs and routing statistics of :func:`reference_moe_forward`.

    Attributes:
        outputs: per shard ``[T_s, H]``.
        routings: per shard :class:`ShardRouting`.
        tokens_per_expert: ``[E]`` long, kept (token, expert) pairs summed over shards: the rows
            each expert computes without padding.
        num_dropped: routed pairs removed by the capacity limit, over all shards.
    """

    outputs: list[torch.Tensor]
    routings: list[ShardRouting]
    tokens_per_expert: torch.Tensor
    num_dropped: int


def reference_moe_forward(
    shards: Sequence[torch.Tensor], weights: MoEWeights, cfg: RoutingConfig
) -> ReferenceResult:
    """Dense MoE forward over routing shards (autograd flows into ``shards`` and ``weights``).

    Each shard is routed on its own (capacity is per shard, as megatron computes it per rank),
    then each expert runs on each shard's kept tokens.

    Args:
        shards: per shard ``[T_s, H]`` tokens.
        weights: full weights (see :class:`MoEWeights`).
        cfg: routing settings.
    """
    routings = [route_shard(x, weights.router, cfg) for x in shards]
    outputs = [torch.zeros_like(x) for x in shards]
    tokens_per_expert = torch.zeros(weights.num_experts, dtype=torch.long)
    for e in range(weights.num_experts):
        for s, (x, r) in enumerate(zip(shards, routings)):
            idx = r.kept[:, e].nonzero().squeeze(1)  # [n]
            tokens_per_expert[e] += idx.numel()
            if idx.numel() == 0:
                continue
            y = swiglu_expert(x[idx], r.probs[idx, e], weights.fc1[e], weights.fc2[e])
            outputs[s] = outputs[s].index_add(0, idx, y)
    num_dropped = sum(int((r.routed & ~r.kept).sum()) for r in routings)
    return ReferenceResult(
        outputs=outputs,
        routings=routings,
        tokens_per_expert=tokens_per_expert,
        num_dropped=num_dropped,
    )


def reference_moe_forward_backward(
    shards: Sequence[torch.Tensor],
    weights: MoEWeights,
    cfg: RoutingConfig,
    grad_outputs: Sequence[torch.Tensor],
) -> tuple[ReferenceResult, list[torch.Tensor], MoEWeights]:
    """Forward, then backward of ``Σ_s <output_s, grad_output_s>``.

    Args:
        shards: per shard ``[T_s, H]`` (not modified; copied into leaves).
        grad_outputs: per shard ``[T_s, H]``, the upstream gradient.

    Returns:
        (result, per-shard input grads ``[T_s, H]``, weight grads as :class:`MoEWeights`).
    """
    leaves = [x.detach().clone().requires_grad_(True) for x in shards]
    params = weights.detached_leaves()
    result = reference_moe_forward(leaves, params, cfg)
    # A shard whose tokens were all dropped has a constant (zero) output: nothing to backprop.
    pairs = [(y, g) for y, g in zip(result.outputs, grad_outputs) if y.requires_grad]
    torch.autograd.backward([y for y, _ in pairs], [g for _, g in pairs])
    input_grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return result, input_grads, params.grads()
