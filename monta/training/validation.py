"""Checks that run before any process group exists, so bad input fails fast instead of hanging.

Every error names the flags involved and their values, and says what to change.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

from monta.parallel import ParallelDims


class ConfigError(ValueError):
    """A flag combination or input that cannot work; the message says how to fix it."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_parallel_dims(args: argparse.Namespace, world_size: int) -> ParallelDims:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--expert-model-parallel-size", ep), ("--expert-tensor-parallel-size", etp)):
        _require(value >= 1, f"{flag} must be >= 1, got {value}")
    _require(world_size % (tp * pp) == 0,
             f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} × "
             f"--pipeline-model-parallel-size {pp} = {tp * pp}; launch a multiple of {tp * pp} "
             f"ranks or change the sizes")
    _require(world_size % (etp * ep * pp) == 0,
             f"world size {world_size} is not divisible by --expert-tensor-parallel-size {etp} × "
             f"--expert-model-parallel-size {ep} × --pipeline-model-parallel-size {pp} = "
             f"{etp * ep * pp}")
    rpn = args.ranks_per_node
    if rpn is not None:
        _require(rpn >= 1 and world_size % rpn == 0,
                 f"--ranks-per-node {rpn} does not divide the world size {world_size}")
    return ParallelDims(world_size, tp, pp, ep, etp)


def validate_model(args: argparse.Namespace, dims: ParallelDims) -> None:
    heads = args.num_attention_heads
    # megatron reads --num-query-groups only under --group-query-attention (config.py too)
    groups = args.num_query_groups if args.group_query_attention else heads
    _require(args.hidden_size % heads == 0,
             f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {heads}")
    _require(heads % dims.tp == 0,
             f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size "
             f"{dims.tp}")
    _require(heads % groups == 0,
             f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}")
    _require(groups % dims.tp == 0,
             f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size "
             f"{dims.tp}")
    _require(args.num_layers % dims.pp == 0,
             f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size "
             f"{dims.pp}")
    _require(args.num_experts >= 1, f"--num-experts must be >= 1, got {args.num_experts}")
    _require(args.num_experts % dims.ep == 0,
             f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size "
             f"{dims.ep}")
    _require(1 <= args.moe_router_topk <= args.num_experts,
             f"--moe-router-topk {args.moe_router_topk} must be between 1 and --num-experts "
             f"{args.num_experts}")
    _require(args.ffn_hidden_size % dims.etp == 0,
             f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by "
             f"--expert-tensor-parallel-size {dims.etp}")
    _require(dims.tp == 1 or args.sequence_parallel,
             f"MoE with --tensor-model-parallel-size {dims.tp} needs --sequence-parallel (each TP "
             f"rank routes its own sequence shard; without it every rank would dispatch the same "
             f"tokens)")
    _require(args.seq_length % dims.tp == 0 or not args.sequence_parallel,
             f"--seq-length {args.seq_length} is not divisible by --tensor-model-parallel-size "
             f"{dims.tp} (required by --sequence-parallel)")
    _require(args.seq_length <= args.max_position_embeddings,
             f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
             f"{args.max_position_embeddings}")
    if args.moe_grouped_gemm:
        _require(args.disable_bias_linear,
                 "--moe-grouped-gemm needs --disable-bias-linear (grouped-GEMM experts have no "
                 "biases)")
    if args.moe_pad_expert_input_to_capacity:
        _require(args.moe_expert_capacity_factor is not None,
                 "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")


def validate_dispatcher(args: argparse.Namespace, known: set[str]) -> None:
    _require(args.moe_token_dispatcher_type in known,
             f"unknown --moe-token-dispatcher-type {args.moe_token_dispatcher_type!r}; choose one "
             f"of {', '.join(sorted(known))}")


def validate_monta_options(args: argparse.Namespace) -> None:
    _require(args.monta_chunks == "tune" or args.monta_chunks >= 1,
             f"--monta-chunks must be >= 1 or tune, got {args.monta_chunks}")
    if args.monta_chunks != 1 or args.monta_node_dedup in ("on", "tune"):
        _require(args.moe_token_dispatcher_type == "monta",
                 f"--monta-chunks {args.monta_chunks} / --monta-node-dedup "
                 f"{args.monta_node_dedup} apply to --moe-token-dispatcher-type monta, not "
                 f"{args.moe_token_dispatcher_type}")


def validate_batch(args: argparse.Namespace, dims: ParallelDims) -> None:
    mbs = args.micro_batch_size
    _require(mbs >= 1, f"--micro-batch-size must be >= 1, got {mbs}")
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dims.dp
    gbs = args.global_batch_size
    _require(gbs % (mbs * dims.dp) == 0,
             f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} × "
             f"data-parallel size {dims.dp} = {mbs * dims.dp}")
    _require(args.train_iters >= 1, f"--train-iters must be >= 1, got {args.train_iters}")
    _require(args.lr_warmup_iters <= args.lr_decay_iters,
             f"--lr-warmup-iters {args.lr_warmup_iters} exceeds --lr-decay-iters "
             f"{args.lr_decay_iters}")
    _require(args.min_lr <= args.lr, f"--min-lr {args.min_lr} exceeds --lr {args.lr}")


def validate_paths(args: argparse.Namespace) -> None:
    if args.mock_data:
        _require(args.vocab_size is not None or args.tokenizer_model is not None,
                 "--mock-data needs --vocab-size or --tokenizer-model")
    else:
        _require(args.data_path is not None,
                 "no --data-path given; run tools/preprocess_data.py and pass its output prefix "
                 "(or use --mock-data)")
        _require(args.tokenizer_model is not None,
                 "no --tokenizer-model given; pass the sentencepiece .model the data was "
                 "preprocessed with")
    if args.tokenizer_model is not None:
        _require(os.path.isfile(args.tokenizer_model),
                 f"--tokenizer-model {args.tokenizer_model} does not exist")
    if args.save_interval is not None:
        _require(args.save is not None, "--save-interval needs --save DIR")
        _require(args.save_interval >= 1, f"--save-interval must be >= 1, got {args.save_interval}")
    if args.exit_signal_handler:
        _require(args.save is not None, "--exit-signal-handler needs --save DIR to save into")


def validate_fault_tolerance(args: argparse.Namespace) -> None:
    _require(args.distributed_timeout_minutes > 0,
             f"--distributed-timeout-minutes must be > 0, got {args.distributed_timeout_minutes}")
    _require(args.max_consecutive_nonfinite >= 1,
             f"--max-consecutive-nonfinite must be >= 1, got {args.max_consecutive_nonfinite}")
    if args.keep_last is not None:
        _require(args.keep_last >= 1, f"--keep-last must be >= 1, got {args.keep_last}")
        _require(args.save is not None, "--keep-last needs --save DIR to prune")
    if args.no_load_fallback:
        _require(args.load is not None, "--no-load-fallback needs --load")


def validate_data_vocabulary(args: argparse.Namespace, tokenizer_vocab_size: int) -> None:
    """The tokenizer against ``--vocab-size`` and the data's token ids (local reads only)."""
    from monta.data.dataset import parse_data_path
    from monta.data.indexed import check_data_prefix, check_token_ids

    _require(args.vocab_size is None or args.vocab_size == tokenizer_vocab_size,
             f"--vocab-size {args.vocab_size} disagrees with --tokenizer-model "
             f"{args.tokenizer_model} ({tokenizer_vocab_size} pieces); drop --vocab-size (the "
             f"tokenizer sets it)")
    if args.mock_data:
        return
    prefixes, _weights = parse_data_path(args.data_path)
    for prefix in prefixes:
        try:
            check_token_ids(check_data_prefix(prefix), tokenizer_vocab_size)
        except ValueError as error:
            raise ConfigError(str(error)) from error


def validate_precision(args: argparse.Namespace, cuda_available: bool) -> None:
    _require(not args.bf16 or cuda_available,
             "--bf16 needs a GPU: megatron-core's mixed-precision optimizer (fp32 master weights) "
             "is CUDA-only; drop --bf16 to train in fp32 on CPU")
    _require(not args.use_distributed_optimizer or cuda_available,
             "--use-distributed-optimizer needs a GPU: megatron-core's distributed optimizer "
             "shards only CUDA tensors; drop it on CPU (each data-parallel rank then keeps the "
             "whole optimizer state)")


def validate_fusions(args: argparse.Namespace) -> None:
    if args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "te":
        _require(importlib.util.find_spec("transformer_engine") is not None,
                 "--cross-entropy-fusion-impl te needs Transformer Engine, which is not "
                 "installed; use --cross-entropy-fusion-impl native")


def validate_recompute(args: argparse.Namespace, dims: ParallelDims) -> None:
    """Megatron-LM's recompute flags: each only with the granularity it belongs to."""
    granularity, method = args.recompute_granularity, args.recompute_method
    count, modules = args.recompute_num_layers, args.recompute_modules
    if granularity != "full":
        given = [f for f, v in (("--recompute-method", method),
                                ("--recompute-num-layers", count)) if v is not None]
        _require(not given, f"{' and '.join(given)} apply to --recompute-granularity full, got "
                            f"{granularity or 'no --recompute-granularity'}")
    if granularity != "selective":
        _require(modules is None, f"--recompute-modules applies to --recompute-granularity "
                                  f"selective, got {granularity or 'no --recompute-granularity'}")
    if granularity == "full":
        per_stage = args.num_layers // dims.pp
        _require(method is not None and count is not None,
                 "--recompute-granularity full needs --recompute-method (uniform: every layer, "
                 "in units of N; block: the first N of each stage) and --recompute-num-layers N")
        _require(1 <= count <= per_stage,
                 f"--recompute-num-layers {count} must be between 1 and the {per_stage} layers "
                 f"of a pipeline stage")
    if granularity == "selective" and "moe_act" in (modules or ()):
        _require(args.moe_grouped_gemm, "--recompute-modules moe_act needs --moe-grouped-gemm "
                                        "(the activation between the grouped expert GEMMs)")


def validate_profiling(args: argparse.Namespace, world_size: int, cuda_available: bool) -> None:
    if not args.profile:
        _require(not args.use_pytorch_profiler,
                 "--use-pytorch-profiler picks the profiler --profile runs; add --profile")
        return
    start, end = args.profile_step_start, args.profile_step_end
    _require(0 <= start < end,
             f"--profile-step-start {start} and --profile-step-end {end}: want 0 <= start < end "
             f"(the iterations after `start` up to `end` are profiled)")
    _require(start < args.train_iters,
             f"--profile-step-start {start} is not below --train-iters {args.train_iters}: "
             f"nothing would be profiled")
    bad = [r for r in args.profile_ranks if not 0 <= r < world_size]
    _require(not bad, f"--profile-ranks {bad} outside the world of {world_size} ranks "
                      f"(0..{world_size - 1})")
    if args.use_pytorch_profiler:
        _require(args.tensorboard_dir is not None,
                 "--use-pytorch-profiler writes its trace under --tensorboard-dir; set it")
    else:
        _require(cuda_available,
                 "--profile without --use-pytorch-profiler marks the window for Nsight Systems "
                 "(cudaProfilerStart/Stop), which needs a GPU; add --use-pytorch-profiler")


def validate_args(args: argparse.Namespace, world_size: int, dispatchers: set[str]) -> ParallelDims:
    """Validate everything that can be checked without communication."""
    dims = validate_parallel_dims(args, world_size)
    validate_model(args, dims)
    validate_dispatcher(args, dispatchers)
    validate_monta_options(args)
    validate_batch(args, dims)
    validate_recompute(args, dims)
    validate_paths(args)
    validate_fault_tolerance(args)
    validate_precision(args, torch.cuda.is_available())
    validate_fusions(args)
    validate_profiling(args, world_size, torch.cuda.is_available())
    return dims
