"""Compute time per rank: FLOPs of one layer (and the LM head) over achieved FLOP/s.

Per rank, per micro-batch, forward (T = s·mbs/TP tokens in the rank's SP shard; q = heads ·
head_dim, g = kv heads · head_dim; backward = 2 × forward, recompute adds 1 × the forward of
what it recomputes):

    attention projections   2·T·(h·(q + 2g) + q·h)             at peak · gemm_efficiency
    core attention (causal) 2·mbs·s²·q / TP                    at peak · attention_efficiency
                            (QKᵀ and AV are 2·s²·q each; causal masking halves them)
    router                  2·T·h·E                            at peak · gemm_efficiency
    experts                 2·M·h·(ffn/ETP)·C                  at peak · eff(n)
                            (M = 3 matrices with SwiGLU, 2 without; C = (row, expert) copies
                            this rank computes, from the dispatcher's volume model)
    LM head (last stage)    2·T·h·V_padded                     at peak · gemm_efficiency

eff(n) = grouped_gemm_efficiency · n / (n + gemm_half_rows) with n rows per local expert GEMM
(per chunk when the MoE layer is pipelined): small GEMMs are memory-bound. Elementwise work
(norms, activations, permutes) and the optimizer step are not modelled.

The same terms, per token and without the dispatcher's copies, give the *model* FLOPs of a
training step that the log line's TFLOP/s uses (:func:`model_flops_per_step`): the planner and
the trainer count FLOPs with one formula.
"""

from __future__ import annotations

from dataclasses import dataclass

from monta.planner.cluster import DeviceSpec
from monta.planner.layout import Layout
from monta.planner.model import ModelSpec, Workload


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs per rank per micro-batch of one transformer layer."""

    projections: float
    """QKV and output projection (+ router)."""
    core_attention: float
    """QKᵀ, softmax·V (causal)."""
    experts: float
    """All (row, expert) GEMMs of this rank's local experts."""
    rows_per_expert: float
    """Rows one local expert GEMM sees per micro-batch (sets its efficiency)."""


def tokens_per_rank(layout: Layout, workload: Workload) -> float:
    """T = s · mbs / TP: the rank's sequence-parallel shard of one micro-batch."""
    return workload.seq_length * workload.micro_batch_size / layout.tp


def projection_flops(model: ModelSpec, tokens: float) -> float:
    """2 · tokens · (h·(q + 2g) + q·h + h·E): QKV, output projection and router."""
    return 2 * tokens * (model.attention_params() + model.hidden_size * model.num_experts)


def core_attention_flops(model: ModelSpec, sequences: float, seq_length: int) -> float:
    """2 · sequences · s² · q: QKᵀ and AV are 2·s²·q each; causal masking halves the sum."""
    return 2 * sequences * seq_length ** 2 * model.q_width


def expert_flops(model: ModelSpec, copies: float, etp: int = 1) -> float:
    """2 · M · h · (ffn / ETP) · copies for ``copies`` (token, expert) rows."""
    return 2 * model.expert_matrices * model.hidden_size * (model.ffn_hidden_size / etp) * copies


def layer_flops(model: ModelSpec, layout: Layout, workload: Workload,
                expert_copies: float) -> LayerFlops:
    """Forward FLOPs of one layer on one rank (module docstring).

    Args:
        expert_copies: (row, expert) pairs this rank's experts compute per micro-batch.
    """
    t = tokens_per_rank(layout, workload)
    core = core_attention_flops(model, workload.micro_batch_size, workload.seq_length) / layout.tp
    experts = expert_flops(model, expert_copies, layout.etp)
    local_experts = model.num_experts // layout.ep
    return LayerFlops(projection_flops(model, t), core, experts, expert_copies / local_experts)


def lm_head_flops(model: ModelSpec, layout: Layout, workload: Workload) -> float:
    """Forward FLOPs of the output layer per rank: 2 · T · h · V_padded (column-parallel over
    TP, on the all-gathered sequence: s·mbs tokens × V/TP columns = T · V)."""
    return 2 * tokens_per_rank(layout, workload) * model.hidden_size * model.padded_vocab(
        layout.tp)


def model_flops_per_step(model: ModelSpec, seq_length: int, sequences: int, tp: int = 1) -> float:
    """Training FLOPs of one step over the whole job: 3 × forward (backward = 2 × forward).

    Forward per sequence: L · (projections + causal core attention + top-k experts) + LM head,
    each token computing exactly k experts (the model's FLOPs: no capacity padding, no
    recomputation). ``tp`` sets megatron's vocabulary padding, which the LM head computes.
    """
    per_sequence = (model.num_layers * (projection_flops(model, seq_length)
                                        + core_attention_flops(model, 1, seq_length)
                                        + expert_flops(model, seq_length * model.topk))
                    + 2 * seq_length * model.hidden_size * model.padded_vocab(tp))
    return 3 * sequences * per_sequence


def expert_efficiency(device: DeviceSpec, rows_per_gemm: float) -> float:
    """eff(n) = grouped_gemm_efficiency · n / (n + gemm_half_rows)."""
    n = max(rows_per_gemm, 1e-9)
    return device.grouped_gemm_efficiency * n / (n + device.gemm_half_rows)


def seconds(flops: float, device: DeviceSpec, efficiency: float) -> float:
    """flops / (peak_tflops · 1e12 · efficiency)."""
    return flops / (device.peak_tflops * 1e12 * efficiency)


@dataclass(frozen=True)
class LayerTimes:
    """Forward seconds of one layer on one rank."""

    projections: float
    """QKV, output projection and router."""
    core_attention: float
    """QKᵀ, softmax·V."""
    experts: float
    """Expert GEMMs in one piece (chunks = 1)."""

    @property
    def attention(self) -> float:
        """Projections + router + core attention."""
        return self.projections + self.core_attention


def layer_times(flops: LayerFlops, device: DeviceSpec, chunks: int = 1) -> LayerTimes:
    """Seconds for ``flops``; the experts run as ``chunks`` GEMM rounds of 1/chunks the rows."""
    eff = expert_efficiency(device, flops.rows_per_expert / chunks)
    return LayerTimes(seconds(flops.projections, device, device.gemm_efficiency),
                      seconds(flops.core_attention, device, device.attention_efficiency),
                      seconds(flops.experts, device, eff))
