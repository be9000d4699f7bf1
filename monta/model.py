"""GPT-MoE built from megatron-core's ``GPTModel`` and MoE layer spec.

Covers the Mixtral architecture (RMSNorm, SwiGLU experts, RoPE, grouped-query attention,
untied embeddings, no biases), so HF checkpoints map onto it one tensor at a time. Uses
Transformer Engine modules when TE is importable and megatron-core's local (torch) modules
otherwise; the MoE layer is :class:`monta.dispatch.MoNTAMoELayer`, whose dispatcher is chosen by
``config.moe_token_dispatcher_type``. Experts (``--moe-grouped-gemm``): TE's ``TEGroupedMLP``
with TE, :class:`monta.experts.MoNTAGroupedMLP` (``torch._grouped_mm``) without; otherwise
megatron's ``SequentialMLP``. Core attention without TE on a GPU is
:class:`monta.attention.SDPAttention` (PyTorch's flash kernels) instead of megatron's unfused one.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from monta import rope
from monta.attention import SDPAttention, sdpa_applies
from monta.dispatch import MoNTAMoELayer
from monta.experts import MoNTAGroupedMLP
from monta.router import MoNTATopKRouter

logger = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def gpt_moe_layer_spec(config: TransformerConfig, use_te: bool | None = None) -> ModuleSpec:
    """One decoder layer: attention + MoE, with our MoE layer class plugged in."""
    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            normalization=config.normalization,
        )
        if config.moe_grouped_gemm:
            # megatron's local spec names GroupedMLP, which needs the grouped_gemm package
            spec.submodules.mlp.submodules.experts = ModuleSpec(module=MoNTAGroupedMLP)
        if sdpa_applies(config):
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.mlp.module = MoNTAMoELayer
    # megatron's router, with the aux losses movable off the dispatch's critical path
    spec.submodules.mlp.submodules.router = MoNTATopKRouter
    return spec


def build_gpt_moe_model(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool = True,
    post_process: bool = True,
    untie_embeddings_and_output_weights: bool = True,
    position_embedding_type: str = "rope",
    rotary_base: int = 10000,
    use_te: bool | None = None,
    vp_stage: int | None = None,
) -> GPTModel:
    """Build this pipeline stage's part of a GPT-MoE.

    Args:
        config: the megatron-core transformer config (MoE fields set).
        vocab_size: padded vocabulary size (a multiple of 128·TP, as Megatron pads it).
        max_sequence_length: longest sequence the position embedding must cover.
        pre_process / post_process: whether this stage holds the embedding / the output head.
    """
    if getattr(config, "monta_rope_fusion", False):
        rope.install()  # megatron's attention calls it for this config (monta/rope.py)
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_moe_layer_spec(config, use_te),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not untie_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )


def pad_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding: a multiple of ``divisible_by · TP`` so each TP shard is aligned."""
    multiple = divisible_by * tensor_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple
