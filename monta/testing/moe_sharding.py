"""Move full MoE weights into a sharded megatron-core MoE layer, and full gradients out of it.

Layout of megatron-core's ``MoELayer`` (``SequentialMLP`` experts) on one rank:
  - ``router.weight`` ``[E, H]``: replicated on every rank. Under sequence parallelism (SP) each
    TP rank routes only its sequence shard, so its grad is partial: megatron marks it
    ``sequence_parallel`` and ``finalize_model_grads`` sums it over TP; DDP then reduces it over DP.
  - ``experts.local_experts.{i}``: global expert ``local_expert_indices[i]``, E/EP experts per EP
    rank. ``linear_fc1.weight`` ``[2F/ETP, H]`` holds this expert-TP rank's slice of *both* halves,
    ``[gate[r·F/ETP:(r+1)·F/ETP]; up[same rows]]`` (so unsharding is done per half);
    ``linear_fc2.weight`` ``[H, F/ETP]`` is sharded along its input dim. Expert grads are partial
    over the expert-data-parallel group (replicas of the same expert see different tokens).
  - grouped experts (``GroupedMLP`` / :class:`monta.experts.MoNTAGroupedMLP`) hold the same
    shards transposed and stacked: ``experts.weight1`` viewed as ``[E/EP, H, 2F/ETP]`` (expert
    i's ``linear_fc1.weight`` transposed) and ``experts.weight2`` as ``[E/EP, F/ETP, H]``.

Gradients here are *sums* over data-parallel replicas (the gradient of the sum of all ranks'
losses); megatron's DDP would further scale by 1/DP.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from monta.testing.moe_reference import MoEWeights

_EXPERT_PARAM = re.compile(r"experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight")
_GROUPED_PARAM = re.compile(r"experts\.(weight1|weight2)")


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _fc1_slice(full_fc1: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """``[2F, H]`` (gate; up) -> this expert-TP rank's ``[2F/ETP, H]`` (gate slice; up slice)."""
    gate, up = torch.chunk(full_fc1, 2, dim=0)  # [F, H] each
    rows = gate.shape[0] // size
    part = slice(rank * rows, (rank + 1) * rows)
    return torch.cat([gate[part], up[part]], dim=0)


def _fc2_slice(full_fc2: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """``[H, F]`` -> ``[H, F/ETP]``."""
    cols = full_fc2.shape[1] // size
    return full_fc2[:, rank * cols : (rank + 1) * cols]


def _split_params(layer: torch.nn.Module):
    """(router weight, {local expert index: {"linear_fc1"/"linear_fc2": param}}, {"weight1" /
    "weight2": grouped param}); rejects other params.

    Raises:
        ValueError: the layer has a parameter this module does not know how to shard (a bias,
            shared experts, ...), so no test silently leaves it out of the comparison.
    """
    router, experts, grouped = None, {}, {}
    for name, param in layer.named_parameters():
        if name == "router.weight":
            router = param
            continue
        match = _EXPERT_PARAM.fullmatch(name)
        if match is not None:
            experts.setdefault(int(match.group(1)), {})[match.group(2)] = param
            continue
        match = _GROUPED_PARAM.fullmatch(name)
        if match is None:
            raise ValueError(f"unsupported MoE layer parameter {name!r} {tuple(param.shape)}")
        grouped[match.group(1)] = param
    if router is None:
        raise ValueError("MoE layer has no router.weight")
    return router, experts, grouped


def _expert_tensors(layer: torch.nn.Module, grads: bool = False) -> dict[int, dict]:
    """Per local expert, ``linear_fc1`` ``[2F/ETP, H]`` and ``linear_fc2`` ``[H, F/ETP]`` in
    ``SequentialMLP``'s orientation, for either experts layout: views of the parameters (so
    ``copy_`` writes them), or of their ``.grad`` with ``grads=True``."""
    _router, experts, grouped = _split_params(layer)
    pick = (lambda p: p.grad) if grads else (lambda p: p)
    if not grouped:
        return {i: {k: pick(p) for k, p in pair.items()} for i, pair in experts.items()}
    n, h = layer.experts.num_local_experts, layer.config.hidden_size
    w1 = pick(grouped["weight1"]).view(n, h, -1)
    w2 = pick(grouped["weight2"]).view(n, -1, h)
    return {i: {"linear_fc1": w1[i].t(), "linear_fc2": w2[i].t()} for i in range(n)}


def load_full_weights(layer: torch.nn.Module, weights: MoEWeights) -> int:
    """Copy this rank's slices of the full ``weights`` into ``layer``'s parameters.

    Args:
        layer: a megatron-core ``MoELayer`` with ``SequentialMLP`` or grouped experts, no biases.
        weights: the full weights, identical on every rank.

    Returns:
        The number of parameter tensors written.
    """
    router, _experts, grouped = _split_params(layer)
    experts = _expert_tensors(layer)
    etp_group = layer.experts.tp_group
    etp_rank, etp_size = _group_rank(etp_group), _group_size(etp_group)
    with torch.no_grad():
        router.copy_(weights.router)
        for i, expert in experts.items():
            e = layer.local_expert_indices[i]
            expert["linear_fc1"].copy_(_fc1_slice(weights.fc1[e], etp_rank, etp_size))
            expert["linear_fc2"].copy_(_fc2_slice(weights.fc2[e], etp_rank, etp_size))
    return 1 + (len(grouped) if grouped else 2 * len(experts))


def finalize_grads(
    layer: torch.nn.Module,
    tp_group: dist.ProcessGroup | None,
    dp_group: dist.ProcessGroup | None,
    expert_dp_group: dist.ProcessGroup | None,
) -> None:
    """Reduce ``.grad`` in place the way megatron's DDP + ``finalize_model_grads`` would (as sums).

    1) params marked ``sequence_parallel``: sum over the TP group (SP saw token shards);
    2) dense (non-expert) params: sum over the data-parallel group;
    3) expert params: sum over the expert-data-parallel group.
    """
    for name, param in layer.named_parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        is_expert = (_EXPERT_PARAM.fullmatch(name) or _GROUPED_PARAM.fullmatch(name)) is not None
        if getattr(param, "sequence_parallel", False) and _group_size(tp_group) > 1:
            dist.all_reduce(param.grad, group=tp_group)
        group = expert_dp_group if is_expert else dp_group
        if _group_size(group) > 1:
            dist.all_reduce(param.grad, group=group)


def collective_device() -> torch.device:
    """Where this job's collectives want their tensors: the rank's GPU under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """Every member's ``t``, returned on the CPU in fp32 (for comparing against references)."""
    if _group_size(group) == 1:
        return [t.detach().float().cpu()]
    t = t.detach().to(collective_device())
    pieces = [torch.empty_like(t) for _ in range(_group_size(group))]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return [p.float().cpu() for p in pieces]


def gather_full_grads(layer: torch.nn.Module) -> MoEWeights:
    """Assemble the full gradients (call :func:`finalize_grads` first). Collective over the
    layer's expert-TP and EP groups; every rank gets the same result.

    Returns:
        :class:`MoEWeights` of grads: router ``[E, H]``, fc1 ``[E, 2F, H]``, fc2 ``[E, H, F]``.
    """
    router = _split_params(layer)[0]
    experts = _expert_tensors(layer, grads=True)
    etp_group, ep_group = layer.experts.tp_group, layer.experts.ep_group
    fc1_local, fc2_local = [], []
    for i in sorted(experts):
        # fc1 [2F/ETP, H] per ETP rank -> gate and up halves gathered separately -> [2F, H]
        pieces = _all_gather(experts[i]["linear_fc1"], etp_group)
        halves = [torch.chunk(p, 2, dim=0) for p in pieces]
        gate = torch.cat([h[0] for h in halves], dim=0)
        up = torch.cat([h[1] for h in halves], dim=0)
        fc1_local.append(torch.cat([gate, up], dim=0))
        # fc2 [H, F/ETP] per ETP rank -> [H, F]
        fc2_local.append(torch.cat(_all_gather(experts[i]["linear_fc2"], etp_group), dim=1))
    # [E/EP, ...] per EP rank, in EP-rank order = global expert order -> [E, ...]
    fc1 = torch.cat(_all_gather(torch.stack(fc1_local), ep_group), dim=0)
    fc2 = torch.cat(_all_gather(torch.stack(fc2_local), ep_group), dim=0)
    return MoEWeights(router=router.grad.detach().float().cpu(), fc1=fc1, fc2=fc2)


def gather_shards(local: torch.Tensor, shard_index: int, num_shards: int) -> torch.Tensor:
    """All-gather one tensor per rank over the world and order it by ``shard_index``.

    Args:
        local: this rank's shard, same shape on every rank.
        shard_index: this rank's position in ``[0, num_shards)`` (= world size).

    Returns:
        ``[num_shards, *local.shape]``.
    """
    if dist.get_world_size() != num_shards:
        raise ValueError(
            f"gather_shards needs one shard per rank: world size {dist.get_world_size()}, "
            f"num_shards {num_shards}"
        )
    pieces = _all_gather(local.detach(), dist.group.WORLD)
    order = [int(i) for i in _all_gather(torch.tensor([shard_index]), dist.group.WORLD)]
    full = torch.empty((num_shards, *local.shape), dtype=torch.float32)
    for piece, i in zip(pieces, order):
        full[i] = piece
    return full
