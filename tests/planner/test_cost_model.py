"""The cost model on a toy cluster, every number computed by hand (tests/planner/conftest.py:
2 nodes × 2 ranks, intra 10 GB/s, inter 1 GB/s with one NIC per node, α = 0, 1 TFLOP/s at
efficiency 1; model L2 h64 ffn128 4 heads E4 top-1 V128; s = 32, micro-batch 1, global 4)."""

from __future__ import annotations

import pytest

from monta.planner.costmodel import PlanContext, candidate_problems, evaluate
from monta.planner.layout import Layout, layout_problems
from monta.planner.model import Workload
from monta.planner.plan import Candidate

TF = 1e12


@pytest.fixture
def ctx(toy, toy_model):
    return PlanContext(toy, toy_model, Workload(32, 1, 4))


def test_step_time_by_hand(ctx):
    plan = evaluate(Candidate(1, 1, 4, 1, "monta"), ctx)
    # EP group = all 4 ranks (one expert each), top-1: P(hit a given rank) = 1/4;
    # per rank T = 32 tokens: 2 remote owners → 16 rows inter, 1 local peer → 8 rows intra;
    # row = 64 · 2 B; metadata 1 column · (4 B fp32 prob + 2 B bf16 mask) per row; 2 ranks
    # share the 1 GB/s NIC
    a2a = (16 * 128 + 16 * 6) / 0.5e9  # 4.288 µs, the intra part (0.1 µs) runs at the same time
    back = 16 * 128 / 0.5e9
    experts = 2 * 3 * 64 * 128 * 32 / TF  # 32 (row, expert) pairs, SwiGLU
    fwd_block, bwd_block = a2a + back + experts, a2a + back + 2 * experts
    attention = (2 * 32 * (64 * (64 + 2 * 64) + 64 * 64 + 64 * 4)  # QKV, out, router
                 + 2 * 1 * 32 ** 2 * 64) / TF  # causal core attention
    layer = 3 * attention + fwd_block + bwd_block
    head = 3 * 2 * 32 * 64 * 128 / TF
    # gradient sync over DP = 4 (2 per node, 1 ring per node through the NIC), distributed
    # optimizer: reduce-scatter fp32 grads + all-gather bf16 params of the dense parameters;
    # experts have expert-DP 1
    dense = 2 * (64 * 192 + 64 * 64 + 2 * 64 + 64 * 4) + 128 * 64 + 64 + 128 * 64
    sync = 3 / 4 * dense * (4 + 2) / 1e9
    assert plan.micro_batches == 1 and (plan.dp, plan.edp) == (4, 1)
    assert plan.step_time_s == pytest.approx(2 * layer + head + sync, rel=1e-9)
    assert sum(p.seconds for p in plan.phases) == pytest.approx(plan.step_time_s, rel=1e-9)
    assert plan.phase("dp/grad_sync").seconds == pytest.approx(sync)
    assert plan.phase("ep/inter").inter_bytes == pytest.approx((16 * 134 + 16 * 128) * 2 * 2)
    assert plan.phase("ep/intra").intra_bytes == pytest.approx((8 * 134 + 8 * 128) * 2 * 2)


def test_memory_by_hand(ctx):
    mem = evaluate(Candidate(1, 1, 4, 1, "monta"), ctx).memory
    dense = 2 * (64 * 192 + 64 * 64 + 2 * 64 + 64 * 4) + 128 * 64 + 64 + 128 * 64
    experts = 2 * 1 * 3 * 64 * 128  # 1 local expert per layer
    assert mem.params_GB == pytest.approx((dense + experts) * 2 / 1e9)
    assert mem.grads_GB == pytest.approx((dense + experts) * 4 / 1e9)
    assert mem.optimizer_GB == pytest.approx((dense / 4 + experts / 1) * 12 / 1e9)
    # per layer: attention 32·(3·64 + 2·64 + 2·64), MoE 2·32·64 + 32 rows·(2·64 + 3·128)
    per_layer = (32 * 448 + 2 * 32 * 64 + 32 * (128 + 384)) * 2
    logits = 32 * 128 * (4 + 2)
    assert mem.activations_GB == pytest.approx((2 * per_layer + logits) / 1e9)


def test_chunks_pipeline_the_moe_block(ctx):
    one = evaluate(Candidate(1, 1, 4, 1, "monta"), ctx)
    four = evaluate(Candidate(1, 1, 4, 1, "monta", chunks=4), ctx)
    # the inter link is the bottleneck (a2a + back); the experts hide behind it: a block goes
    # from a2a + back + experts to a2a + back + experts / 4 (α = 0, no launch cost), forward
    # (experts e) and backward (2e), in each of the 2 layers
    experts = 2 * 3 * 64 * 128 * 32 / TF
    saved = 2 * ((experts - experts / 4) + (2 * experts - 2 * experts / 4))
    assert one.step_time_s - four.step_time_s == pytest.approx(saved, rel=1e-6)


def test_hop_cost_is_paid_once_per_monta_hop_whatever_the_chunks(make_cluster, toy_model):
    def step(dispatcher, hop_us, **options):
        cluster = make_cluster(device__hop_overhead_us=hop_us)
        ctx = PlanContext(cluster, toy_model, Workload(32, 1, 4))
        return evaluate(Candidate(1, 1, 4, 1, dispatcher, **options), ctx).step_time_s

    # per MoE block: flat monta sends a2a + back (2 hops), dedup a2a + fan-out + their two
    # returns (4); a forward and a backward block in each of 2 layers, 1 micro-batch
    for options, hops in (({}, 2), ({"chunks": 4}, 2), ({"node_dedup": True}, 4)):
        added = step("monta", 100.0, **options) - step("monta", 0.0, **options)
        assert added == pytest.approx(2 * 2 * hops * 100e-6, rel=1e-9), options
    # megatron's stock path: its permutation is priced by α and launch costs only
    assert step("alltoall", 100.0) == step("alltoall", 0.0)


def test_ds_tp_sends_tp_times_the_inter_bytes(ctx):
    monta = evaluate(Candidate(2, 1, 2, 2, "monta"), ctx)
    ds_tp = evaluate(Candidate(2, 1, 2, 2, "ds_tp"), ctx)
    assert ds_tp.phase("ep/inter").inter_bytes / monta.phase("ep/inter").inter_bytes == \
        pytest.approx(2 * (128 + 5 * 2) / (128 + 5 * 2), rel=1e-9)
    assert ds_tp.step_time_s > monta.step_time_s


def test_recompute_trades_time_for_memory(ctx):
    plain = evaluate(Candidate(1, 1, 4, 1, "alltoall"), ctx)
    full = evaluate(Candidate(1, 1, 4, 1, "alltoall", recompute="full"), ctx)
    assert full.step_time_s > plain.step_time_s
    assert full.memory.activations_GB < plain.memory.activations_GB


def test_selective_recompute_costs_what_it_reruns(ctx):
    """``moe`` reruns the MoE block's forward (dispatch, experts, combine) and nothing else;
    ``layernorm`` and ``moe_act`` rerun elementwise work the model does not time, so they cost
    no time; each keeps less than none and more than full; ``core_attn`` drops nothing under
    flash attention (the toy device's) but reruns the core attention."""
    from monta.planner.recompute import selective

    def plan(recompute="none"):
        return evaluate(Candidate(1, 1, 4, 1, "monta", recompute=recompute), ctx)

    plain, full = plan(), plan("full")
    moe, cheap = plan(selective("moe", "layernorm")), plan(selective("layernorm", "moe_act"))
    for phase in ("ep/inter", "ep/intra"):
        for attr in ("inter_bytes", "intra_bytes"):
            assert getattr(moe.phase(phase), attr) == pytest.approx(
                1.5 * getattr(plain.phase(phase), attr))  # (2 + 1) / 2 passes of the block
    assert moe.phase("compute/experts").raw_seconds == pytest.approx(
        4 / 3 * plain.phase("compute/experts").raw_seconds)
    assert moe.phase("compute/attention").seconds == plain.phase("compute/attention").seconds
    assert moe.phase("tp/collectives").seconds == plain.phase("tp/collectives").seconds
    assert cheap.step_time_s == plain.step_time_s
    for p in (moe, cheap):
        assert full.memory.activations_GB < p.memory.activations_GB < \
            plain.memory.activations_GB
    core = plan(selective("core_attn"))
    assert ctx.cluster.device.flash_attention
    assert core.memory.activations_GB == plain.memory.activations_GB
    core_fwd = 2 * 1 * 32 ** 2 * 64 / TF  # one forward of the causal core attention
    assert core.phase("compute/attention").seconds - plain.phase(
        "compute/attention").seconds == pytest.approx(2 * core_fwd)  # 2 layers, 1 micro-batch
    assert str(core.candidate).endswith("recompute core_attn")
    assert "--recompute-granularity selective --recompute-modules core_attn --" in " ".join(
        core.flags)
    with pytest.raises(ValueError, match="selective:<modules>"):
        Candidate(1, 1, 4, 1, recompute="selective:mlp")


def test_validity_rules_match_the_training_checks(toy_model):
    wl = Workload(32, 1, 4)
    assert layout_problems(Layout(4, 2, 4, 1, 1, 1), toy_model, wl) == [
        "TP 4 does not fit inside a node of 2 ranks"]
    assert "world 4 not divisible by ETP·EP·PP = 8" in layout_problems(
        Layout(4, 2, 1, 1, 4, 2), toy_model, wl)
    assert "experts 4 not divisible by EP 3" in layout_problems(Layout(3, 3, 1, 1, 3, 1),
                                                                 toy_model, wl)
    assert layout_problems(Layout(4, 2, 1, 2, 2, 1), toy_model, Workload(32, 1, 3)) == [
        "global batch 3 not divisible by micro batch 1 × DP 2"]
    with pytest.raises(ValueError, match="node_dedup / chunks apply to the monta dispatcher"):
        Candidate(1, 1, 4, 1, "alltoall", chunks=2)


def test_invalid_candidates_are_refused_with_reasons(ctx):
    assert candidate_problems(Candidate(2, 1, 2, 2, "monta", node_dedup=True), ctx) == []
    assert candidate_problems(Candidate(1, 1, 2, 1, "monta", node_dedup=True), ctx) == [
        "node dedup needs an EP group that spans nodes"]
    with pytest.raises(ValueError, match="TP2·PP1·EP1·ETP1 ds_tp cannot run.*"):
        evaluate(Candidate(2, 1, 1, 1, "ds_tp"), ctx.__class__(ctx.cluster, ctx.model,
                                                               Workload(31, 1, 4)))


def test_measured_skew_slows_the_busiest_rank(ctx):
    from monta.planner.routing import routing_from_obj

    skewed = ctx.__class__(ctx.cluster, ctx.model, ctx.workload,
                           routing_from_obj([0.55, 0.15, 0.15, 0.15], "hist.json"))
    even = evaluate(Candidate(1, 1, 4, 1, "alltoall"), ctx)
    hot = evaluate(Candidate(1, 1, 4, 1, "alltoall"), skewed)
    # expert 0's rank computes 0.55 · 4 = 2.2 × the mean rows
    assert hot.phase("compute/experts").raw_seconds == pytest.approx(
        2.2 * even.phase("compute/experts").raw_seconds)
    assert hot.step_time_s > even.step_time_s and any("2.20×" in n for n in hot.notes)
