"""Fuzz: the MoNTA dispatcher computes megatron's MoE function exactly — outputs and every
gradient equal a single-process dense reference — over random shapes, routings and options.

≥ 200 cases: top-k 1–8, 4–64 experts, layouts TP1·EP4, TP2·EP2+SP, TP2·EP2·ETP2+SP, TP1·EP2,
one or two emulated nodes, node dedup on/off, 1–8 pipelined chunks, random and adversarial
(all tokens to the same experts) routing, with and without capacity dropping (and megatron's
pad-to-capacity); plus the ds_tp
baseline. One spawned 4-rank job per layout runs all of its cases.
"""

from __future__ import annotations

import random

import pytest

from monta.dispatch.monta_dispatcher import DispatchOptions
from monta.testing import run_distributed
from monta.testing.moe_layer_check import (
    MoECase,
    MoELayout,
    MoEShape,
    check_against_reference,
    run_mixed_cases,
)


LAYOUTS = [MoELayout(1, 4, 1), MoELayout(2, 2, 1), MoELayout(2, 2, 2), MoELayout(1, 2, 1)]
CASES_PER_LAYOUT = 52


def fuzz_items(layout: MoELayout, seed: int) -> list:
    rng = random.Random(seed)
    items = []
    for i in range(CASES_PER_LAYOUT):
        experts = rng.choice([e for e in (4, 8, 16, 32, 64) if e % layout.ep == 0])
        topk = rng.randint(1, min(8, experts))
        # adversarial: every token to experts 0..k-1, all on EP rank 0 (the others get nothing)
        all_on_rank0 = topk <= experts // layout.ep
        hot = tuple(range(topk)) if all_on_rank0 and rng.random() < 0.2 else ()
        capacity = rng.choice([None, None, None, 0.5, 1.0]) if not hot else None
        pad = capacity is not None and rng.random() < 0.4  # megatron's drop-and-pad routing
        case = MoECase(f"fuzz{i}", topk=topk, pre_softmax=topk == 1 or rng.random() < 0.3,
                       capacity_factor=capacity, pad_to_capacity=pad, hot_experts=hot,
                       seed=seed * 1000 + i)
        shape = MoEShape(num_experts=experts, hidden_size=rng.choice([8, 16]),
                         ffn_hidden_size=8 * layout.etp, seq_per_shard=rng.choice([2, 6, 12]),
                         micro_batch_size=rng.choice([1, 2]))
        if i % 13 == 12:
            dispatcher = "ds_tp"
        else:
            dispatcher = ("monta", DispatchOptions(node_dedup=rng.choice(["on", "off", "auto"]),
                                                   chunks=rng.randint(1, 8)))
        items.append((case, shape, dispatcher, rng.choice([2, 4])))
    return items


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_monta_dispatcher_fuzz(layout):
    items = fuzz_items(layout, seed=LAYOUTS.index(layout) + 1)
    results = run_distributed(run_mixed_cases, layout.world_size, layout, items, timeout_s=300)[0]
    assert len(results) == len(items)
    compared = 0
    for got in results:
        # a random capacity factor need not drop anything on a small shard
        compared += check_against_reference(layout, got, got["shape"], require_drops=False)
    assert compared == sum(3 + 2 * shape.num_experts for _, shape, _, _ in items)
    options = [d[1] for _, _, d, _ in items if isinstance(d, tuple)]
    assert {o.node_dedup for o in options} == {"on", "off", "auto"}
    assert max(o.chunks for o in options) > 4 and min(o.chunks for o in options) == 1
