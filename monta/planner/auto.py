"""``pretrain_moe.py --auto-plan``: pick the layout and dispatcher from the flags' model.

    overrides = plan_for_args(args, world_size, "a800_hdr200")   # or a cluster YAML path
    vars(args).update(overrides)                                 # before validate_args

Pure Python (no torch.distributed): every rank computes the same plan from the same inputs; the
plan is logged once (rank 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from monta.planner.cluster import load_cluster
from monta.planner.costmodel import PlanContext
from monta.planner.model import model_from_args, workload_from_args
from monta.planner.recompute import recompute_of_args, recompute_settings, selective
from monta.planner.routing import load_routing
from monta.planner.search import SearchSpace, plan_for

logger = logging.getLogger(__name__)

# pretrain_moe.py flags → argparse dests the plan sets
_DESTS = {
    "--tensor-model-parallel-size": "tensor_model_parallel_size",
    "--pipeline-model-parallel-size": "pipeline_model_parallel_size",
    "--expert-model-parallel-size": "expert_model_parallel_size",
    "--expert-tensor-parallel-size": "expert_tensor_parallel_size",
    "--moe-token-dispatcher-type": "moe_token_dispatcher_type",
    "--monta-node-dedup": "monta_node_dedup",
    "--monta-chunks": "monta_chunks",
}


def _tokenizer_vocab(args: argparse.Namespace) -> int | None:
    """The sentencepiece model's vocabulary when --vocab-size is not given (else None)."""
    path = getattr(args, "tokenizer_model", None)
    if getattr(args, "vocab_size", None) or not path:
        return None
    try:
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=path).vocab_size()
    except (ImportError, OSError, RuntimeError):
        return None


def supported_recompute(grouped_gemm: bool = False) -> tuple[str, ...]:
    """Recompute modes the planner may pick for ``pretrain_moe.py``: ``none``; ``full`` (as
    ``--recompute-granularity full --recompute-method uniform --recompute-num-layers 1``); and
    two selective sets, the MoE layer with both norms (``moe``, ``layernorm``: keeps each
    layer's attention tensors, reruns the dispatch) and, with ``grouped_gemm`` (megatron allows
    ``moe_act`` only under ``--moe-grouped-gemm``), the experts' activation with both norms
    (elementwise reruns only)."""
    from monta.training.arguments import build_parser

    options = build_parser()._option_string_actions  # noqa: SLF001 (argparse has no API)
    if "--recompute-granularity" not in options:
        return ("none",)
    out = ("none", "full", selective("layernorm", "moe"))
    return out + ((selective("layernorm", "moe_act"),) if grouped_gemm else ())


def recompute_space(args: argparse.Namespace) -> tuple[str, ...]:
    """What the search may choose given the user's own recompute flags: their choice when they
    made one (``full``, or ``selective`` with its modules), else every mode
    :func:`supported_recompute` lists."""
    if getattr(args, "recompute_granularity", None) in ("full", "selective"):
        return (recompute_of_args(args),)
    return supported_recompute(bool(getattr(args, "moe_grouped_gemm", False)))


def plan_for_args(args: argparse.Namespace, world_size: int, cluster_spec_path_or_preset: str,
                  routing: str | None = None, space: SearchSpace | None = None) -> dict:
    """The best plan for ``args``' model and batch on ``world_size`` ranks of the cluster, as
    ``{argparse dest: value}`` overrides for the parallel layout and dispatcher (plus
    ``global_batch_size`` = micro-batch × world when the flags leave it unset). Memory is costed
    with or without the distributed optimizer as ``args`` says; that flag is left to the user.

    Args:
        args: parsed ``pretrain_moe.py`` flags (model, --seq-length, batch sizes are read).
        world_size: ranks in the job (WORLD_SIZE).
        cluster_spec_path_or_preset: a cluster YAML (tools/bench_comm.py) or a preset name.
        routing: optional expert-load histogram (JSON / TensorBoard dir), default uniform.
        space: restrict the search (default: everything pretrain_moe.py can run).
    """
    cluster = load_cluster(cluster_spec_path_or_preset)
    ranks_per_node = getattr(args, "ranks_per_node", None)
    if ranks_per_node and ranks_per_node != cluster.ranks_per_node:
        raise ValueError(f"--ranks-per-node {ranks_per_node} disagrees with the cluster spec "
                         f"{cluster.name} ({cluster.ranks_per_node} ranks per node)")
    cluster = cluster.with_world(world_size)
    workload = workload_from_args(args)
    # without --global-batch-size the trainer runs one micro-batch per DP rank, so the tokens
    # per step would change with the layout; fix it at micro-batch × world (every DP divides it)
    global_batch = workload.global_batch(world_size)
    ctx = PlanContext(cluster, model_from_args(args, _tokenizer_vocab(args)),
                      dataclasses.replace(workload, global_batch_size=global_batch),
                      load_routing(routing),
                      distributed_optimizer=bool(getattr(args, "use_distributed_optimizer",
                                                         False)))
    space = space or SearchSpace(recompute=recompute_space(args))
    plan = plan_for(ctx, space)
    if os.environ.get("RANK", "0") == "0":
        logger.info("auto-plan on %s (%d ranks): %s", cluster.name, world_size, plan.summary())
    flags = list(plan.flags)
    overrides: dict = {}
    for flag, dest in _DESTS.items():
        if flag in flags:
            value = flags[flags.index(flag) + 1]
            overrides[dest] = int(value) if value.isdigit() else value
    overrides["sequence_parallel"] = plan.candidate.tp > 1 or bool(
        getattr(args, "sequence_parallel", False))
    if getattr(args, "global_batch_size", None) is None:
        overrides["global_batch_size"] = global_batch
    if getattr(args, "recompute_granularity", None) is None:
        # the planner's own pick; a user's own recompute flags are kept as given
        overrides.update(recompute_settings(plan.candidate.recompute))
    return overrides
