"""Run a megatron-core MoE layer on several ranks, case after case, and bring back what to compare.

:func:`run_moe_layer_cases` is the rank body for :func:`monta.testing.run_distributed`: for one
parallel layout it builds a ``MoNTAMoELayer`` per case, loads full weights rebuilt from the case's
seed, runs forward and backward on this rank's token shard, reduces the gradients as megatron
would, and gathers everything into full tensors. :func:`case_inputs` rebuilds the same inputs in
any process, so the caller can run :mod:`monta.testing.moe_reference` on them and compare.

Token shards: rank (dp, tp) holds shard ``dp·TP + tp`` of ``[shards, S, B, H]``; with SP that is
its slice of the sequence, without TP its data-parallel micro-batch. Each shard is routed on its
own, as each rank's router sees only its shard.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from monta.testing.moe_reference import (
    MoEWeights,
    RoutingConfig,
    capacity_per_shard,
    random_moe_weights,
    reference_moe_forward_backward,
)
from monta.testing.moe_sharding import (
    finalize_grads,
    gather_full_grads,
    gather_shards,
    load_full_weights,
)


@dataclasses.dataclass(frozen=True)
class MoELayout:
    """Parallel sizes of one job. DP = world/TP; expert DP = world/(EP·ETP); SP iff TP > 1."""

    tp: int
    ep: int
    etp: int
    world_size: int = 4

    def __post_init__(self):
        if self.world_size % self.tp or self.world_size % (self.ep * self.etp):
            raise ValueError(
                f"world_size {self.world_size} must be divisible by tp {self.tp} and by "
                f"ep·etp {self.ep}·{self.etp}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.ep * self.etp)

    @property
    def name(self) -> str:
        sp = "-sp" if self.tp > 1 else ""
        return f"tp{self.tp}-ep{self.ep}-etp{self.etp}-dp{self.dp}{sp}"


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """Model and micro-batch sizes: E experts, H hidden, F ffn, S tokens of sequence per shard."""

    num_experts: int = 8
    hidden_size: int = 16
    ffn_hidden_size: int = 24
    seq_per_shard: int = 8
    micro_batch_size: int = 2
    dtype: torch.dtype = torch.float32
    """Parameters and activations of the layer under test (the reference is always fp32)."""
    grouped_gemm: bool = False
    """Experts as one grouped GEMM per projection (:class:`monta.experts.MoNTAGroupedMLP`)
    instead of megatron's ``SequentialMLP``."""


@dataclasses.dataclass(frozen=True)
class MoECase:
    """One routing scenario, run with every layout."""

    name: str
    topk: int
    capacity_factor: float | None = None
    pad_to_capacity: bool = False
    drop_policy: str = "probs"
    pre_softmax: bool = False
    hot_experts: tuple[int, ...] = ()
    """Adversarial routing: these experts win top-k for every token (set ``topk`` of them)."""
    seed: int = 0

    def routing(self) -> RoutingConfig:
        return RoutingConfig(
            topk=self.topk,
            capacity_factor=self.capacity_factor,
            drop_policy=self.drop_policy,
            pre_softmax=self.pre_softmax,
        )


def case_inputs(
    layout: MoELayout, case: MoECase, shape: MoEShape
) -> tuple[MoEWeights, torch.Tensor, torch.Tensor]:
    """Deterministic full weights, tokens and upstream gradient of one case.

    Returns:
        (weights, tokens ``[shards, S, B, H]``, grad_output ``[shards, S, B, H]``), shards = world.
    """
    h = shape.hidden_size
    gen = torch.Generator().manual_seed(10_000 + case.seed)
    size = (layout.world_size, shape.seq_per_shard, shape.micro_batch_size, h)
    tokens = torch.randn(size, generator=gen)
    grad_output = torch.randn(size, generator=gen)
    hot_direction = torch.ones(h) / h**0.5
    if case.hot_experts:
        # Every token gets the same component 3 along the hot direction: the hot experts' logits
        # (≈ 9 and up) beat the others' (≈ N(0, 1)) for every token.
        tokens = tokens - (tokens @ hot_direction).unsqueeze(-1) * hot_direction
        tokens = tokens + 3.0 * hot_direction
    weights = random_moe_weights(
        shape.num_experts,
        h,
        shape.ffn_hidden_size,
        seed=case.seed,
        hot_experts=case.hot_experts,
        hot_direction=hot_direction,
    )
    return weights, tokens, grad_output


def _config(layout: MoELayout, case: MoECase, shape: MoEShape, dispatcher_type: str):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        moe_ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=4,
        num_moe_experts=shape.num_experts,
        moe_router_topk=case.topk,
        moe_router_pre_softmax=case.pre_softmax,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type=dispatcher_type,
        moe_expert_capacity_factor=case.capacity_factor,
        moe_pad_expert_input_to_capacity=case.pad_to_capacity,
        moe_token_drop_policy=case.drop_policy,
        moe_grouped_gemm=shape.grouped_gemm,
        tensor_model_parallel_size=layout.tp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.tp > 1,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=shape.dtype,
        bf16=shape.dtype == torch.bfloat16,
    )


def _run_case(layout: MoELayout, case: MoECase, shape: MoEShape, dispatcher_type,
              passes: int = 1) -> dict:
    """Build, load, run forward + backward, reduce grads, gather: one case on this rank.

    ``dispatcher_type`` is a registered name, or ``(name, DispatchOptions)`` for MoNTA's.
    With ``passes`` > 1 the same layer runs that many times (a tuning dispatcher changes its
    options between passes): the results are the last pass's, ``pass_spread`` the largest
    difference of any pass's output or input gradient from the first's (max over ranks), and
    ``tuned`` the tuner's choice on every rank.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module

    from monta.model import gpt_moe_layer_spec
    from monta.testing.moe_sharding import collective_device

    name, options = dispatcher_type if isinstance(dispatcher_type, tuple) else (dispatcher_type,
                                                                                None)
    config = _config(layout, case, shape, name)
    if options is not None:  # a monta.dispatch.monta_dispatcher.DispatchOptions
        config.monta_dispatch = options
    layer = build_module(
        gpt_moe_layer_spec(config).submodules.mlp,
        config=config,
        pg_collection=get_default_pg_collection(),
    )
    device = collective_device()
    layer.to(device).train()
    weights, tokens, grad_output = case_inputs(layout, case, shape)
    tokens, grad_output = tokens.to(device, shape.dtype), grad_output.to(device, shape.dtype)
    num_params = load_full_weights(layer, weights)

    # Rows each local expert computes (padding included), seen at the experts' input.
    seen = {}

    def record(_module, args):  # summed: a pipelined dispatcher calls the experts per chunk
        seen["rows"] = seen.get("rows", 0) + args[0].shape[0]
        per_expert = torch.as_tensor(args[1]).to(torch.long).reshape(-1)
        seen["per_expert"] = seen.get("per_expert", 0) + per_expert

    hook = layer.experts.register_forward_pre_hook(record)

    shard = ps.get_data_parallel_rank() * layout.tp + ps.get_tensor_model_parallel_rank()
    spread = torch.zeros(1, dtype=torch.float64, device=device)
    for i in range(passes):
        seen.clear()
        for p in layer.parameters():
            p.grad = None
        x = tokens[shard].clone().requires_grad_(True)  # [S, B, H]
        output, bias = layer(x)
        if bias is not None:
            raise AssertionError("the MoE layer returned an MLP bias; the reference has none")
        output.backward(grad_output[shard])
        if i == 0:
            first = (output.detach().clone(), x.grad.clone())
        else:
            spread = torch.maximum(spread, torch.tensor([max(
                (output.detach() - first[0]).abs().max().item(),
                (x.grad - first[1]).abs().max().item())], dtype=torch.float64, device=device))
    hook.remove()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    tuner = getattr(layer.token_dispatcher, "tuner", None)
    tuned = [None] * dist.get_world_size()
    dist.all_gather_object(tuned, None if tuner is None or tuner.chosen is None
                           else str(tuner.chosen))

    finalize_grads(
        layer,
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
    )
    grads = gather_full_grads(layer)

    # [E]: rows computed per expert, counted once per expert-TP group (its ranks share rows).
    expert_rows = torch.zeros(shape.num_experts, dtype=torch.long, device=device)
    if ps.get_expert_tensor_parallel_rank() == 0:
        expert_rows[layer.local_expert_indices] += seen["per_expert"].to(device)
    dist.all_reduce(expert_rows)
    rank_rows = torch.zeros(layout.world_size, dtype=torch.long, device=device)
    rank_rows[dist.get_rank()] = seen["rows"]
    dist.all_reduce(rank_rows)

    return {
        "case": case,
        "output": gather_shards(output.detach(), shard, layout.world_size),
        "input_grad": gather_shards(x.grad, shard, layout.world_size),
        "grads": grads,
        "num_params_loaded": num_params,
        "num_params_per_rank": sum(1 for _ in layer.parameters()),
        "expert_rows": expert_rows.cpu(),
        "rank_rows": rank_rows.cpu(),
        "pass_spread": spread.item(),
        "tuned": tuned,
    }


def check_against_reference(layout: MoELayout, got: dict, shape: MoEShape,
                            require_drops: bool = True, rtol: float = 1e-5,
                            atol: float = 1e-5) -> int:
    """Compare one result of :func:`run_mixed_cases` with the dense single-process reference
    (outputs, input gradient, every weight gradient, rows per expert); AssertionError naming the
    case and tensor on any mismatch. Returns the number of tensors compared.

    Tolerances: fp32 differs from the reference only by summation order (1e-5); a bf16 layer
    also rounds weights, activations and every matmul (pass ~3e-2).
    """
    case = got["case"]
    weights, tokens, grad_output = case_inputs(layout, case, shape)
    h = shape.hidden_size
    shards = [t.reshape(-1, h) for t in tokens]  # [S·B, H]: the order the router flattens to
    ref, ref_input_grads, ref_grads = reference_moe_forward_backward(
        shards, weights, case.routing(), [g.reshape(-1, h) for g in grad_output]
    )
    where = f"{layout.name} / {got['dispatcher']} / {case.name}"

    compared = {
        "output": (got["output"], torch.stack(ref.outputs).reshape(tokens.shape)),
        "input grad": (got["input_grad"], torch.stack(ref_input_grads).reshape(tokens.shape)),
        "router grad": (got["grads"].router, ref_grads.router),
    }
    for e in range(shape.num_experts):
        compared[f"expert {e} fc1 grad"] = (got["grads"].fc1[e], ref_grads.fc1[e])
        compared[f"expert {e} fc2 grad"] = (got["grads"].fc2[e], ref_grads.fc2[e])
    for name, (actual, expected) in compared.items():
        torch.testing.assert_close(
            actual, expected, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{where}: {n}: {m}"
        )
    assert compared["output"][1].abs().max() > 0.1, f"{where}: reference output is ~0"
    assert ref_grads.fc1.abs().max() > 0.1, f"{where}: reference expert grads are ~0"
    assert ref_grads.router.abs().max() > 1e-3, f"{where}: reference router grad is ~0"

    # Routing statistics: the layer computed the rows the reference says it should.
    tokens_per_shard = shards[0].shape[0]
    routed_pairs = layout.world_size * tokens_per_shard * case.topk
    if case.capacity_factor is None:
        assert ref.num_dropped == 0
        assert int(ref.tokens_per_expert.sum()) == routed_pairs
    elif require_drops:
        assert ref.num_dropped > 0, f"{where}: capacity case dropped nothing"
    if case.pad_to_capacity:
        capacity = capacity_per_shard(
            tokens_per_shard, shape.num_experts, case.topk, case.capacity_factor
        )
        expected_rows = torch.full_like(got["expert_rows"], capacity * layout.world_size)
    else:
        expected_rows = ref.tokens_per_expert
    name = got["dispatcher"][0] if isinstance(got["dispatcher"], tuple) else got["dispatcher"]
    if name == "ds_tp" and layout.etp == 1:
        expected_rows = expected_rows * layout.tp  # DeepSpeed-style: every TP rank repeats them
    assert torch.equal(got["expert_rows"], expected_rows), (
        f"{where}: rows per expert {got['expert_rows'].tolist()}, expected {expected_rows.tolist()}"
    )
    if case.hot_experts:
        cold = [e for e in range(shape.num_experts) if e not in case.hot_experts]
        assert int(ref.tokens_per_expert[cold].sum()) == 0, f"{where}: routing not adversarial"
        if not case.pad_to_capacity and layout.ep > 1:  # with EP = 1 every rank has them
            assert int(got["rank_rows"].min()) == 0, (
                f"{where}: no rank got zero tokens: {got['rank_rows'].tolist()}"
            )
    return len(compared)


def run_moe_layer_cases(
    rank: int,
    world_size: int,
    layout: MoELayout,
    cases: list[MoECase],
    shape: MoEShape,
    dispatcher_types: tuple[str, ...] = ("alltoall",),
) -> list[dict] | None:
    """Rank body: every (dispatcher, case) pair under one layout, dispatcher-major.

    Returns the gathered results on rank 0 (None elsewhere). Each result dict holds
    ``dispatcher``, ``case``, ``output`` and ``input_grad`` ``[shards, S, B, H]``, ``grads``
    (:class:`MoEWeights`, summed over DP replicas), ``expert_rows`` ``[E]`` (rows each expert
    computed, padding included) and ``rank_rows`` ``[world]`` (rows each rank's experts computed).
    """
    if world_size != layout.world_size:
        raise ValueError(
            f"layout {layout.name} needs world size {layout.world_size}, got {world_size}"
        )
    items = [(case, shape, d, None) for d in dispatcher_types for case in cases]
    return run_mixed_cases(rank, world_size, layout, items)


def run_mixed_cases(rank: int, world_size: int, layout: MoELayout, items: list) -> list | None:
    """Rank body for fuzzing: each item is ``(case, shape, dispatcher, ranks_per_node)``, so
    shapes, dispatcher options and the emulated node layout change from case to case
    (``ranks_per_node=None``: the job's own topology); an optional fifth element is the
    number of passes (:func:`_run_case`)."""
    from monta.compat import apply_cpu_patches

    apply_cpu_patches()
    from megatron.core import parallel_state as ps

    from monta import parallel
    from monta.topology import Topology

    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    try:
        results = []
        for case, shape, dispatcher, ranks_per_node, *passes in items:
            if ranks_per_node is not None:
                parallel.set_topology(Topology.uniform(world_size, ranks_per_node))
            try:
                result = _run_case(layout, case, shape, dispatcher, *passes)
            except Exception as exc:
                raise RuntimeError(f"dispatcher {dispatcher!r}, case {case.name!r}, layout "
                                   f"{layout.name}, {ranks_per_node} ranks per node failed"
                                   ) from exc
            results.append({"dispatcher": dispatcher, "shape": shape, **result})
    finally:
        parallel.set_topology(None)
        ps.destroy_model_parallel()
    return results if rank == 0 else None
