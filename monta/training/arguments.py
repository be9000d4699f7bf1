"""Command-line flags, named as in Megatron-LM so existing launch scripts carry over.

Only the flags MoNTA implements are accepted; an unknown flag is an error, never ignored.
"""

from __future__ import annotations

import argparse
from typing import Sequence

# Dispatchers megatron-core builds itself, plus those registered by MoNTA (see monta.dispatch).
DISPATCHER_CHOICES = ("alltoall", "monta", "ds_tp", "allgather")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4,
                   help="transformer layers (each with an MoE MLP)")
    g.add_argument("--hidden-size", type=int, default=256,
                   help="model width H")
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="expert/MLP hidden size; default 4 × hidden (× 2/3 with --swiglu)")
    g.add_argument("--num-attention-heads", type=int, default=8,
                   help="query heads")
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention (use --num-query-groups)")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="key/value heads with --group-query-attention (default: heads)")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="head dimension (default hidden / heads)")
    g.add_argument("--seq-length", type=int, default=256,
                   help="tokens per sample")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="defaults to --seq-length")
    g.add_argument("--position-embedding-type", choices=("rope", "learned_absolute", "none"),
                   default="rope")
    g.add_argument("--rotary-base", type=int, default=10000,
                   help="RoPE base θ (Mixtral: 1e6)")
    g.add_argument("--no-rope-fusion", action="store_true",
                   help="RoPE as megatron's unfused ops, not MoNTA's one-kernel RoPE "
                        "(monta/rope.py, CUDA with Triton; megatron's fusion needs TE)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="megatron-core's fused vocab-parallel cross entropy (fewer passes over "
                        "the [tokens, vocab] logits)")
    g.add_argument("--cross-entropy-fusion-impl", choices=("native", "te"), default="native",
                   help="with --cross-entropy-loss-fusion: megatron's torch.compile'd kernels "
                        "(native) or Transformer Engine's (te, needs TE)")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="RMSNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5,
                   help="epsilon of the norms")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU experts (gated SiLU)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="separate output layer (Mixtral)")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="no biases in linear layers (Mixtral)")
    g.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="dropout after attention and MLP")
    g.add_argument("--attention-dropout", type=float, default=0.0,
                   help="dropout on attention probabilities")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="std of the normal weight init")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this × TP")


def _add_moe_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=8,
                   help="experts per MoE layer")
    g.add_argument("--moe-router-topk", type=int, default=2,
                   help="experts per token")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax over all experts before the top-k (megatron-core requires it "
                        "for top-1: a softmax over one chosen logit is constant)")
    g.add_argument("--moe-token-dispatcher-type", default="alltoall",
                   help=f"one of {', '.join(DISPATCHER_CHOICES)} (and those MoNTA registers)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2,
                   help="load-balancing loss weight")
    g.add_argument("--moe-router-load-balancing-type", choices=("aux_loss", "seq_aux_loss", "none"),
                   default="aux_loss")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="tokens per expert above capacity are dropped; default dropless")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="pad every expert to its capacity (drop-and-pad)")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="experts as one grouped GEMM per projection: TE's when it imports, else "
                        "torch._grouped_mm or, on Hopper once tools/build_sm90_kernels.py has "
                        "built it, MoNTA's CUTLASS library (bf16 on GPUs; a per-expert loop on "
                        "CPU); large experts (>= 128 GFLOP per expert GEMM) run one cuBLAS "
                        "GEMM each instead (monta/per_expert_gemm.py); MONTA_GROUPED_GEMM in the "
                        "environment picks the kernel (monta/expert_gemm.py)")
    g.add_argument("--monta-node-dedup", choices=("auto", "on", "off", "tune"), default="auto",
                   help="monta dispatcher: send a token once per remote node and fan it out "
                        "inside the node (auto: when top-k makes it pay; tune: time both at "
                        "the first forwards and keep the faster)")
    g.add_argument("--monta-chunks", type=_chunks, default=1,
                   help="monta dispatcher: pipeline each MoE layer over this many token chunks "
                        "(inter-node transfers overlap intra-node ones and expert compute); "
                        "tune: time 1/2/4/8 at the first forwards and keep the fastest")


def _chunks(text: str) -> int | str:
    if text == "tune":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'tune', got {text!r}") from None


def _add_topology_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("topology")
    g.add_argument("--auto-plan", metavar="CLUSTER", default=None,
                   help="choose TP/PP/EP/ETP, the dispatcher and its options with monta.planner "
                        "for this cluster YAML or preset (a800_hdr200, h100_ndr400, "
                        "testbed_1gbit); see tools/plan.py")
    g.add_argument("--ranks-per-node", type=int, default=None,
                   help="declare N consecutive ranks per node (emulated nodes on one host); "
                        "default: torchrun's LOCAL_WORLD_SIZE / hostnames (env "
                        "MONTA_RANKS_PER_NODE also works)")


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism (DP = world size / (TP · PP))")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP: shards attention/MLP weights; keep inside a node")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard activations over TP along the sequence (required for MoE with TP > 1)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP: layer stages (1F1B schedule)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="EP: experts split over ranks")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="defaults to --tensor-model-parallel-size")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over DP")
    g.add_argument("--distributed-backend", choices=("gloo", "nccl"), default=None,
                   help="default: nccl with CUDA, gloo without")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="collective timeout (fractions allowed): a dead or stuck rank makes the "
                        "others exit with a message naming the phase and the peer, never hang; "
                        "also the longest any one phase (a layer's dispatch, a save) may take")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2,
                   help="samples per rank per micro-batch")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch × DP (one micro-batch per step)")
    g.add_argument("--train-iters", type=int, default=100,
                   help="optimizer steps")
    g.add_argument("--lr", type=float, default=3e-4,
                   help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0,
                   help="learning rate at the end of decay")
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root",
                                                "WSD"), default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="defaults to --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0,
                   help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="gradient-norm clipping (0: off)")
    g.add_argument("--adam-beta1", type=float, default=0.9,
                   help="Adam β1")
    g.add_argument("--adam-beta2", type=float, default=0.95,
                   help="Adam β2")
    g.add_argument("--adam-eps", type=float, default=1e-8,
                   help="Adam ε")
    g.add_argument("--no-adam-fusion", action="store_true",
                   help="without TE/apex: torch's multi-tensor Adam instead of its fused kernel "
                        "(the default, on GPU and CPU; megatron would use TE's or apex's fused "
                        "Adam)")
    g.add_argument("--seed", type=int, default=1234,
                   help="random seed (weights, data order, dropout)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 weights/activations with fp32 master weights (GPU)")
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="initialise full weights on the CPU and slice them (layout-independent)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM, save a checkpoint at the end of the step and exit 0")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="exit (after saving) when the iteration is a multiple of this")
    g.add_argument("--max-consecutive-nonfinite", type=int, default=5,
                   help="a step with a non-finite loss or gradient norm is skipped (weights "
                        "untouched, counted in 'skipped iterations'); after this many in a row, "
                        "save the last good state and exit with code 4")


# megatron-core's recompute_modules this trainer supports (the planner costs the same ones)
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "moe")


def _add_recompute_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("activation recomputation (megatron-core's, as in Megatron-LM)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="full: keep only each recomputed layer's input and rerun the layer (its "
                        "MoE dispatch included) in the backward pass; selective: rerun only "
                        "--recompute-modules")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                   help="with full: uniform recomputes every layer in units of "
                        "--recompute-num-layers; block the first --recompute-num-layers of each "
                        "pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="with full: layers per recomputed unit (uniform) or per stage (block)")
    g.add_argument("--recompute-modules", nargs="+", default=None,
                   choices=RECOMPUTE_MODULES,
                   help="with selective: the submodules to rerun (default core_attn); moe_act "
                        "needs --moe-grouped-gemm")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="prefix of .bin/.idx, or weight prefix weight prefix …")
    g.add_argument("--split", default="969,30,1",
                   help="train,valid,test weights of the documents")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=("SentencePieceTokenizer",), help="tokenizer family")
    g.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model (the bundled one: monta/data/bundled/tokenizer.model)")
    g.add_argument("--mock-data", action="store_true",
                   help="random tokens instead of --data-path (for smoke tests)")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary for --mock-data")


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None,
                   help="checkpoint directory to write")
    g.add_argument("--load", default=None,
                   help="checkpoint directory (or one iter_* dir) to resume from; equal to --save: auto-resume")
    g.add_argument("--save-interval", type=int, default=None,
                   help="save every N iterations (and at the end)")
    g.add_argument("--no-save-optim", action="store_true",
                   help="save weights without optimizer state")
    g.add_argument("--no-load-optim", action="store_true",
                   help="ignore the checkpoint's optimizer state")
    g.add_argument("--no-load-rng", action="store_true",
                   help="ignore the checkpoint's RNG state")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only; start at iteration 0 with a fresh optimizer")
    g.add_argument("--no-load-fallback", action="store_true",
                   help="stop (exit 2) if the checkpoint --load finds fails verification, instead "
                        "of falling back to the previous good one with a warning")
    g.add_argument("--keep-last", type=int, default=None, metavar="K",
                   help="keep only the K newest checkpoints under --save; older ones are deleted "
                        "only after a newer save is complete and verified (default: keep all)")
    g.add_argument("--ckpt-format", choices=("torch_dist",), default="torch_dist",
                   help="megatron-core dist_checkpointing format (reshardable)")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10,
                   help="iterations between log lines / TensorBoard points")
    g.add_argument("--eval-interval", type=int, default=100,
                   help="iterations between validation runs")
    g.add_argument("--eval-iters", type=int, default=5,
                   help="validation batches per run (0: no validation)")
    g.add_argument("--tensorboard-dir", default=None,
                   help="write TensorBoard events here")
    g.add_argument("--no-progress-bar", action="store_true",
                   help="plain log lines only (the bar is also off when stdout is not a terminal)")
    g.add_argument("--wandb-project", default=None,
                   help="log to this Weights & Biases project (needs `pip install wandb`; "
                        "WANDB_MODE=offline is honoured)")
    g.add_argument("--wandb-exp-name", default=None,
                   help="W&B run name (default: wandb picks one)")
    g.add_argument("--wandb-save-dir", default=None,
                   help="W&B run directory (default: {--save}/wandb)")
    g.add_argument("--profile", action="store_true",
                   help="profile the iterations after --profile-step-start up to "
                        "--profile-step-end on --profile-ranks: with --use-pytorch-profiler a "
                        "torch.profiler trace, else cudaProfilerStart/Stop around them for "
                        "`nsys profile --capture-range=cudaProfilerApi` (GPU only)")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="with --profile: torch.profiler (shapes and Python stacks recorded); "
                        "the trace goes to --tensorboard-dir (TensorBoard's profiler plugin, "
                        "or Perfetto), a summary of the top kernels to the log")
    g.add_argument("--profile-step-start", type=int, default=10,
                   help="profiling starts after this many iterations (default 10)")
    g.add_argument("--profile-step-end", type=int, default=12,
                   help="and stops after this many (default 12: two iterations profiled)")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0],
                   help="global ranks that profile (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_moe.py",
        description="Pre-train a GPT Mixture-of-Experts model with MoNTA (run under torchrun).",
        allow_abbrev=False,
    )
    for add in (_add_model_args, _add_moe_args, _add_topology_args, _add_parallel_args,
                _add_training_args, _add_recompute_args, _add_data_args, _add_checkpoint_args,
                _add_logging_args):
        add(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags and fill derived defaults (no validation against the world size here)."""
    args = build_parser().parse_args(argv)
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = args.tensor_model_parallel_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.ffn_hidden_size is None:
        ffn = 4 * args.hidden_size
        args.ffn_hidden_size = int(ffn * 2 / 3) if args.swiglu else ffn
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    return args
