"""Flags → megatron-core ``TransformerConfig`` (the one place the two vocabularies meet)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from monta.dispatch.monta_dispatcher import DispatchOptions


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float32


def transformer_config_from_args(args: argparse.Namespace) -> TransformerConfig:
    dtype = params_dtype(args)
    config = TransformerConfig(
        # model shape
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        # mixture of experts
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
        moe_grouped_gemm=args.moe_grouped_gemm,
        # parallelism
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        # activation recomputation
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=args.recompute_modules,
        # precision: bf16 params/activations, fp32 master weights in the optimizer
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=args.use_cpu_initialization or not torch.cuda.is_available(),
        # 1) no fused kernels on CPU; on GPU they come with TE / apex when present
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,  # TE's; MoNTA's own is config.monta_rope_fusion below
        cross_entropy_loss_fusion=args.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=args.cross_entropy_fusion_impl,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
    )
    # MoNTA's own dispatcher options travel on the config, like megatron's moe_* fields
    config.monta_dispatch = DispatchOptions(node_dedup=args.monta_node_dedup,
                                            chunks=args.monta_chunks)
    # RoPE as one Triton kernel each way where it applies (monta/rope.py; CUDA)
    config.monta_rope_fusion = args.position_embedding_type == "rope" and not args.no_rope_fusion
    return config
