"""megatron-core's MoE layer on 4 gloo ranks vs a dense single-process reference.

For each parallel layout one spawned job runs every routing case (top-k 1/2/4, dropless, capacity
dropping with and without padding, all tokens to the same experts) with each dispatcher (the
``alltoall`` baseline and ``allgather``) and brings back the layer's output and the gradients of
its input and of every weight, gathered into full tensors; this process recomputes them with
:mod:`monta.testing.moe_reference` and compares.

Tolerance (fp32): ``rtol = atol = 1e-5``; the values are O(1) and the differences come only from
summation order (reduce-scatter over expert-TP, gradient sums over TP and DP).
"""

import dataclasses

import pytest

from monta.dispatch.monta_dispatcher import DispatchOptions
from monta.testing import run_distributed
from monta.testing.moe_layer_check import (
    MoECase,
    MoELayout,
    MoEShape,
    check_against_reference,
    run_moe_layer_cases,
)

DISPATCHERS = ("alltoall", "allgather")
TIMEOUT_S = 180

SHAPE = MoEShape(num_experts=8, hidden_size=16, ffn_hidden_size=24, seq_per_shard=8)

LAYOUTS = [
    MoELayout(tp=1, ep=4, etp=1),  # DP4, expert DP1
    MoELayout(tp=2, ep=2, etp=1),  # SP; DP2, expert DP2 (each expert on two ranks)
    MoELayout(tp=2, ep=2, etp=2),  # SP; expert-TP2 splits every expert's FFN dim
    MoELayout(tp=1, ep=2, etp=1),  # DP4, expert DP2
]

# megatron-core requires pre-softmax routing for top-1 (post-softmax over one logit has a zero
# gradient): "Please use --moe-router-pre-softmax when topk is 1."
CASES = [
    MoECase("top1", topk=1, pre_softmax=True, seed=1),
    MoECase("top2", topk=2, seed=2),
    MoECase("top4", topk=4, seed=3),
    MoECase("top2-pre-softmax", topk=2, pre_softmax=True, seed=4),
    MoECase("top1-cf1.0-drop", topk=1, pre_softmax=True, capacity_factor=1.0, seed=5),
    MoECase("top2-cf0.5-drop", topk=2, capacity_factor=0.5, seed=6),
    MoECase("top2-cf1.0-pad", topk=2, capacity_factor=1.0, pad_to_capacity=True, seed=7),
    MoECase("top4-cf0.5-pad", topk=4, capacity_factor=0.5, pad_to_capacity=True, seed=8),
    MoECase("top2-cf0.5-position", topk=2, capacity_factor=0.5, drop_policy="position", seed=9),
    # Adversarial: every token picks experts 0.. (all on EP rank 0), the other ranks get none.
    MoECase("all-to-expert0-top1", topk=1, pre_softmax=True, hot_experts=(0,), seed=10),
    MoECase("all-to-experts01-top2", topk=2, hot_experts=(0, 1), seed=11),
    MoECase(
        "all-to-expert0-top1-cf1.0-drop",
        topk=1,
        pre_softmax=True,
        capacity_factor=1.0,
        hot_experts=(0,),
        seed=12,
    ),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_moe_layer_matches_dense_reference(layout: MoELayout):
    results = run_distributed(
        run_moe_layer_cases,
        layout.world_size,
        layout,
        CASES,
        SHAPE,
        DISPATCHERS,
        timeout_s=TIMEOUT_S,
    )
    rank0 = results[0]
    assert all(r is None for r in results[1:])
    assert [(r["dispatcher"], r["case"]) for r in rank0] == [
        (d, c) for d in DISPATCHERS for c in CASES
    ]
    # Every parameter of the layer was loaded from the full weights (none left unchecked).
    assert all(r["num_params_loaded"] == r["num_params_per_rank"] for r in rank0)
    num_compared = sum(check_against_reference(layout, got, SHAPE) for got in rank0)
    assert num_compared == len(DISPATCHERS) * len(CASES) * (3 + 2 * SHAPE.num_experts)


# Grouped-GEMM experts (monta.experts.MoNTAGroupedMLP; on CPU its per-expert loop) under both
# the stock dispatcher and MoNTA's: EP with empty ranks, expert-TP sharding of the stacked
# weights, capacity dropping/padding, and one rank holding every expert (MoNTA's sync-free
# local path). The last layout has one shard, so the case whose only token-dropping shard
# leaves no router gradient is left out there.
GROUPED_SHAPE = dataclasses.replace(SHAPE, grouped_gemm=True)
GROUPED_DISPATCHERS = ("alltoall", ("monta", DispatchOptions()))
GROUPED_LAYOUTS = [LAYOUTS[0], LAYOUTS[2], MoELayout(tp=1, ep=1, etp=1, world_size=1)]


@pytest.mark.parametrize("layout", GROUPED_LAYOUTS, ids=lambda layout: layout.name)
def test_grouped_experts_match_dense_reference(layout: MoELayout):
    cases = [c for c in CASES
             if layout.world_size > 1 or c.name != "all-to-expert0-top1-cf1.0-drop"]
    results = run_distributed(run_moe_layer_cases, layout.world_size, layout, cases,
                              GROUPED_SHAPE, GROUPED_DISPATCHERS, timeout_s=TIMEOUT_S)
    rank0 = results[0]
    assert len(rank0) == len(GROUPED_DISPATCHERS) * len(cases)
    # router + the two stacked expert weights, all loaded from the full weights
    assert all(r["num_params_loaded"] == r["num_params_per_rank"] == 3 for r in rank0)
    num_compared = sum(check_against_reference(layout, got, GROUPED_SHAPE) for got in rank0)
    assert num_compared == len(rank0) * (3 + 2 * SHAPE.num_experts)


def test_grouped_experts_on_padded_rows_match_dense_reference(monkeypatch):
    """MoNTA's one-rank path with each expert's rows padded to start at a multiple of 4 (on a
    Hopper it pads to the aligned GEMMs' tile, monta/dispatch/padded_order.py; forced here so
    the CPU loop runs the same layout): same outputs and gradients as the dense reference,
    real rows per expert unchanged, more rows at the experts than routed copies."""
    monkeypatch.setenv("MONTA_EXPERT_ROW_ALIGNMENT", "4")
    layout = GROUPED_LAYOUTS[-1]
    cases = [c for c in CASES if c.capacity_factor is None]  # the order padding applies to
    results = run_distributed(run_moe_layer_cases, layout.world_size, layout, cases,
                              GROUPED_SHAPE, (("monta", DispatchOptions()),), timeout_s=TIMEOUT_S)
    rank0 = results[0]
    assert len(rank0) == len(cases) > 0
    for got in rank0:
        check_against_reference(layout, got, GROUPED_SHAPE)
        routed = int(got["expert_rows"].sum())
        assert int(got["rank_rows"][0]) == routed + SHAPE.num_experts * 3, got["case"].name
