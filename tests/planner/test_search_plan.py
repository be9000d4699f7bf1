"""Search, ranking, the frozen Plan, its *why* and flags, and the --auto-plan hook."""

from __future__ import annotations

import dataclasses

import pytest

from monta.planner.auto import plan_for_args, recompute_space, supported_recompute
from monta.planner.cluster import PRESET_DIR, load_cluster
from monta.planner.costmodel import PlanContext, evaluate
from monta.planner.layout import Layout, layout_problems
from monta.planner.model import (
    ModelSpec, Workload, load_model, model_from_args, workload_from_args,
)
from monta.planner.plan import Candidate
from monta.planner.search import SearchSpace, plan_for, search
from monta.training.arguments import parse_args


def test_ranked_fitting_frozen_and_explained(toy, toy_model):
    result = search(PlanContext(toy, toy_model, Workload(32, 1, 8)))
    times = [p.step_time_s for p in result.ranked]
    assert times == sorted(times) and result.evaluated == len(result.all_plans())
    assert all(p.memory.fits for p in result.ranked)
    best = result.best
    assert best.why and any(w in best.why[0] for w in ("dominates", "largest", "compute is"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        best.step_time_s = 0.0
    # the printed flags run: pretrain_moe.py parses them into the same layout
    args = parse_args(list(best.flags))
    c = best.candidate
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.expert_model_parallel_size, args.expert_tensor_parallel_size) == (
        c.tp, c.pp, c.ep, c.etp)
    assert args.moe_token_dispatcher_type == c.dispatcher and args.ranks_per_node == 2
    assert model_from_args(args, vocab_size=toy_model.vocab_size).total_params() == \
        toy_model.total_params()
    assert best.command().startswith("torchrun --nnodes 2 --nproc-per-node 2 pretrain_moe.py")


def test_node_dedup_is_picked_and_explained_when_top_k_is_large(toy):
    model = ModelSpec(num_layers=2, hidden_size=1024, ffn_hidden_size=256, num_attention_heads=8,
                      num_query_groups=8, num_experts=8, topk=8, vocab_size=128)
    best = search(PlanContext(toy, model, Workload(256, 1, 4)), SearchSpace(ep=(4,))).best
    assert best.candidate.dispatcher == "monta" and best.candidate.node_dedup
    assert "node dedup cuts its bytes 2.0×" in best.why[0]  # 4 owner ranks → 2 nodes, k = 8


def test_paper_layout_monta_against_ds_tp():
    """TP8·EP2·ETP8 on 2 × 8 A800: ds_tp sends TP = 8 × monta's inter-node bytes."""
    ctx = PlanContext(load_cluster("a800_hdr200"), load_model("paper-2x70b"),
                      Workload(8192, 1, 16))
    ds_tp = evaluate(Candidate(8, 1, 2, 8, "ds_tp"), ctx)
    monta = evaluate(Candidate(8, 1, 2, 8, "monta", chunks=4), ctx)
    ratio = ds_tp.phase("ep/inter").inter_bytes / monta.phase("ep/inter").inter_bytes
    assert ratio == pytest.approx(8.0, rel=0.02)  # metadata columns differ slightly
    assert ds_tp.ep_comm_seconds() / monta.ep_comm_seconds() > 4
    assert monta.step_time_s < ds_tp.step_time_s
    assert not monta.memory.fits  # 125 B params do not train on 16 × 80 GB (docs/planner.md)


def test_no_plan_fits_raises_with_the_leanest_need(toy, toy_model):
    tiny = dataclasses.replace(toy, device=dataclasses.replace(toy.device, memory_GB=1e-6))
    with pytest.raises(ValueError, match=r"no strategy fits in 1e-06 GB.*the leanest"):
        plan_for(PlanContext(tiny, toy_model, Workload(32, 1, 4)))


def test_auto_plan_overrides_for_pretrain_args():
    args = parse_args(["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
                       "--group-query-attention", "--num-query-groups", "2",
                       "--ffn-hidden-size", "256", "--swiglu", "--num-experts", "8",
                       "--moe-router-topk", "2", "--seq-length", "128", "--micro-batch-size", "4",
                       "--global-batch-size", "16", "--vocab-size", "4096"])
    overrides = plan_for_args(args, 4, "testbed_1gbit")
    assert set(overrides) >= {"tensor_model_parallel_size", "pipeline_model_parallel_size",
                              "expert_model_parallel_size", "expert_tensor_parallel_size",
                              "moe_token_dispatcher_type", "sequence_parallel"}
    assert "global_batch_size" not in overrides  # given: the planner keeps the user's
    vars(args).update(overrides)
    layout = Layout(4, 2, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                    args.expert_model_parallel_size, args.expert_tensor_parallel_size)
    assert layout_problems(layout, model_from_args(args), Workload(128, 4, 16)) == []
    no_batch = parse_args(["--num-experts", "8", "--micro-batch-size", "2", "--seq-length", "64"])
    assert plan_for_args(no_batch, 4, "testbed_1gbit")["global_batch_size"] == 2 * 4
    assert supported_recompute() == ("none", "full", "selective:layernorm,moe")
    assert supported_recompute(grouped_gemm=True) == (
        "none", "full", "selective:layernorm,moe", "selective:layernorm,moe_act")
    with pytest.raises(ValueError, match="--ranks-per-node 4 disagrees"):
        plan_for_args(parse_args(["--ranks-per-node", "4"]), 4, "testbed_1gbit")


def test_auto_plan_recomputes_when_memory_needs_it_and_keeps_a_users_choice(tmp_path):
    """On a cluster whose memory fits only full-recompute strategies, the planner picks one; on
    one that fits selective (MoE layer and norms) but not none, it picks that; each time it sets
    Megatron-LM's flags, which pretrain_moe.py's checks accept. A user's own recompute flags
    bound the search (full: full only; selective: their modules, megatron's core_attn if none
    named) and are not overwritten."""
    import yaml

    from monta.planner.recompute import selective
    from monta.training.validation import (
        validate_model, validate_parallel_dims, validate_recompute,
    )

    flags = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
             "--ffn-hidden-size", "512", "--swiglu", "--disable-bias-linear",
             "--num-experts", "8", "--moe-router-topk", "2", "--seq-length", "2048",
             "--micro-batch-size", "8", "--global-batch-size", "32", "--vocab-size", "4096"]
    cluster = load_cluster("testbed_1gbit")
    ctx = PlanContext(cluster.with_world(4), model_from_args(parse_args(flags)),
                      workload_from_args(parse_args(flags)))
    moe = selective("layernorm", "moe")
    leanest = {rc: min(p.memory.total_GB for p in search(
        ctx, SearchSpace(recompute=(rc,), check_memory=False), explain_best=False).all_plans())
        for rc in ("none", "full", moe)}
    assert leanest["full"] < leanest[moe] < leanest["none"]
    spec = yaml.safe_load((PRESET_DIR / "testbed_1gbit.yaml").read_text())

    def planned_between(low, high, name):
        spec["device"]["memory_GB"] = (low + high) / 2 / spec["device"]["memory_headroom"]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        args = parse_args(flags)
        overrides = plan_for_args(args, 4, str(path))
        vars(args).update(overrides)
        dims = validate_parallel_dims(args, 4)
        validate_model(args, dims)
        validate_recompute(args, dims)
        return overrides

    overrides = planned_between(leanest["full"], leanest[moe], "full_only")
    assert (overrides["recompute_granularity"], overrides["recompute_method"],
            overrides["recompute_num_layers"]) == ("full", "uniform", 1)
    overrides = planned_between(leanest[moe], leanest["none"], "selective")
    assert (overrides["recompute_granularity"], overrides["recompute_modules"]) == (
        "selective", ["layernorm", "moe"])
    assert "recompute_method" not in overrides

    mine = parse_args([*flags, "--recompute-granularity", "full", "--recompute-method", "block",
                       "--recompute-num-layers", "2"])
    assert recompute_space(mine) == ("full",)
    assert "recompute_method" not in plan_for_args(mine, 4, "testbed_1gbit")  # kept: block, 2
    assert recompute_space(parse_args([*flags, "--recompute-granularity", "selective"])) == (
        "selective:core_attn",)
    assert recompute_space(parse_args([*flags, "--recompute-granularity", "selective",
                                       "--recompute-modules", "moe", "layernorm"])) == (moe,)
    assert recompute_space(parse_args(flags)) == ("none", "full", moe)
    assert recompute_space(parse_args([*flags, "--moe-grouped-gemm"]))[-1] == selective(
        "layernorm", "moe_act")
