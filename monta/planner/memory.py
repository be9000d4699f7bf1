"""Memory per rank: parameters, gradients, optimizer state and activations, worst PP stage.

Model state per parameter, as MoNTA trains (monta/training/pretrain.py: megatron DDP with
``grad_reduce_in_fp32=True``, Adam):

    bf16 training:  params 2 B + fp32 main grads 4 B + fp32 master 4 B + Adam m, v 8 B
    fp32 training:  params 4 B + grads 4 B + Adam m, v 8 B
    --use-distributed-optimizer shards master + m + v over DP (experts: over expert-DP).

Parameters per rank: attention (QKV + out) / TP, norms, router, E/EP experts of ffn/ETP,
embedding on the first stage and output layer on the last, each V_padded · h / TP.

Activations per layer per micro-batch, per rank (elements × b; T tokens of the SP shard,
q = heads·head_dim, g = kv heads·head_dim), after Korthikanti et al. (2022) with sequence
parallelism and flash attention (no s² scores; without flash add 2·heads/TP·mbs·s² for scores
and softmax):

    attention block   T · (3h + 2q + 2g)        norm input, residual, QKV input, Q/K/V, context
    MoE block         2·T·h + R · (2h + M·ffn/ETP)   router/norm input; per held row: the
                      received row, its copy at the expert, M/ETP·ffn of GEMM outputs
                      (R = rows held by this rank, × the routing imbalance)
    ds_tp             + (TP − 1)·T·h for the gathered tokens

1F1B keeps min(PP, micro-batches) micro-batches in flight on the first stage (1 on the last,
which also holds the loss's fp32 softmax of T·TP × V/TP, plus the b-byte logits unless they
are fp32 themselves). Full recompute keeps only each layer's input (T·h). Selective recompute
(Megatron-LM's ``--recompute-modules``) drops from each layer:

    core_attn   the scores and softmax (2·heads/TP·mbs·s²; nothing with flash attention, which
                keeps none)
    layernorm   both norms' outputs (T·h each: the QKV input and the router/experts' input)
    moe_act     the activation's output per held row (R · ffn/ETP)
    moe         the MoE layer but its input (everything past the pre-MLP norm)

The backward pass then holds, besides every layer's kept part, either the loss's tensors (until
it begins) or one recomputed layer's dropped part, not both. ``bench/recompute_memory.py``
measures each setting on CPU against these estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

from monta.planner.cluster import DeviceSpec
from monta.planner.layout import Layout
from monta.planner.model import ModelSpec, Workload
from monta.planner.recompute import parse_recompute

GB = 1e9


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank of the heaviest PP stage, in GB (1e9)."""

    params_GB: float
    grads_GB: float
    optimizer_GB: float
    activations_GB: float
    capacity_GB: float
    """memory_GB × memory_headroom."""

    @property
    def total_GB(self) -> float:
        return self.params_GB + self.grads_GB + self.optimizer_GB + self.activations_GB

    @property
    def fits(self) -> bool:
        return self.total_GB <= self.capacity_GB


def params_per_rank(model: ModelSpec, layout: Layout, stage: int) -> tuple[float, float]:
    """(dense, expert) parameter elements on one rank of PP stage ``stage``."""
    h = model.hidden_size
    layers = model.num_layers // layout.pp
    dense = layers * (model.attention_params() / layout.tp + 2 * h + h * model.num_experts)
    experts = layers * (model.num_experts // layout.ep) * model.expert_params() / layout.etp
    vocab = model.padded_vocab(layout.tp) * h / layout.tp
    if stage == 0:
        dense += vocab
    if stage == layout.pp - 1:
        dense += h + (vocab if model.untie_embeddings or layout.pp > 1 else 0)
    return dense, experts


def memory_estimate(model: ModelSpec, layout: Layout, workload: Workload, device: DeviceSpec,
                    held_rows: float, imbalance: float, recompute: str, micro_batches: int,
                    distributed_optimizer: bool, ds_tp: bool = False) -> MemoryEstimate:
    """Worst stage's memory (module docstring).

    Args:
        held_rows: rows this rank's experts hold per micro-batch (volume model).
        imbalance: busiest owner's load over the mean (1 = uniform routing).
        recompute: ``none``, ``full`` or ``selective:<modules>`` (monta/planner/recompute.py).
        micro_batches: per step (sets 1F1B's in-flight count).
    """
    granularity, modules = parse_recompute(recompute)
    b = device.bytes_per_element
    t = workload.seq_length * workload.micro_batch_size / layout.tp
    h, q, g = model.hidden_size, model.q_width, model.kv_width
    scores = 0.0 if device.flash_attention else 2 * model.num_attention_heads / layout.tp * (
        workload.micro_batch_size * workload.seq_length ** 2)
    rows = held_rows * imbalance
    routed = rows * (2 * h + model.expert_matrices * model.ffn_hidden_size / layout.etp) + (
        (layout.tp - 1) * t * h if ds_tp else 0.0)
    # each block keeps its norm's input (the residual) and output (T·h each)
    attention = t * (3 * h + 2 * q + 2 * g) + scores
    moe = 2 * t * h + routed
    per_layer = (attention + moe) * b
    kept = per_layer
    if granularity == "full":
        kept = t * h * b
    elif granularity == "selective":
        dropped = (scores if "core_attn" in modules else 0.0) + (
            2 * t * h if "layernorm" in modules else 0.0)
        if "moe" in modules:
            dropped += routed
        elif "moe_act" in modules:
            dropped += rows * model.ffn_hidden_size / layout.etp
        kept = per_layer - dropped * b
    layers = model.num_layers // layout.pp
    master = 12 if device.dtype == "bf16" else 8
    worst = None
    for stage in sorted({0, layout.pp - 1}):
        dense, experts = params_per_rank(model, layout, stage)
        shard_dense = layout.dp if distributed_optimizer else 1
        shard_experts = layout.edp if distributed_optimizer else 1
        in_flight = min(layout.pp - stage, micro_batches)
        # the loss keeps fp32 softmax over this rank's vocabulary shard; with bf16 logits also
        # the logits themselves (fp32 logits are turned into the softmax in place)
        logits = t * layout.tp * model.padded_vocab(layout.tp) / layout.tp * (
            4 + (b if b != 4 else 0)) if stage == layout.pp - 1 else 0.0
        if granularity == "none":
            acts = layers * per_layer * in_flight + logits
        else:
            # the loss's tensors are freed before the first layer is recomputed: the peak is
            # the larger of the two, over every layer's kept part
            recomputed = per_layer if granularity == "full" else per_layer - kept
            acts = layers * kept * in_flight + max(recomputed, logits)
        estimate = MemoryEstimate(
            params_GB=(dense + experts) * b / GB,
            grads_GB=(dense + experts) * 4 / GB,
            optimizer_GB=(dense / shard_dense + experts / shard_experts) * master / GB,
            activations_GB=acts / GB,
            capacity_GB=device.memory_GB * device.memory_headroom)
        if worst is None or estimate.total_GB > worst.total_GB:
            worst = estimate
    return worst
