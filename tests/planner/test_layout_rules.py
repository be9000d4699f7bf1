"""The planner's layout rules (``monta.planner.layout.layout_problems``) against the checks
``pretrain_moe.py`` runs before any process group (``monta.training.validation``): over a few
hundred random layouts, models and batches, the planner calls a layout runnable exactly when
training accepts it and its TP and expert-TP groups fit inside a node. The two are written for
different readers (short reasons in a ranked table, flag names in an error), so this keeps them
from drifting apart."""

from __future__ import annotations

import random

import pytest

from monta.planner.layout import Layout, layout_problems
from monta.planner.model import model_from_args, workload_from_args
from monta.training.arguments import parse_args
from monta.training.validation import (
    ConfigError, validate_batch, validate_model, validate_parallel_dims,
)


def _random_case(rng: random.Random) -> tuple[list[str], int, int, tuple[int, int, int, int]]:
    heads = rng.choice((4, 6, 8, 12))
    gqa = rng.random() < 0.5
    flags = ["--num-layers", str(rng.choice((2, 3, 4, 6))),
             "--hidden-size", str(heads * 16), "--num-attention-heads", str(heads),
             "--ffn-hidden-size", str(rng.choice((48, 64, 96, 128))), "--swiglu",
             "--disable-bias-linear", "--num-experts", str(rng.choice((4, 6, 8, 16))),
             "--moe-router-topk", "2", "--seq-length", str(rng.choice((48, 64, 96))),
             "--micro-batch-size", str(rng.choice((1, 2)))]
    groups = str(rng.choice([g for g in (1, 2, 3, 4, 6) if heads % g == 0]))
    if gqa:
        flags += ["--group-query-attention", "--num-query-groups", groups]
    elif rng.random() < 0.5:  # megatron reads --num-query-groups only with GQA on
        flags += ["--num-query-groups", groups]
    if rng.random() < 0.7:
        flags += ["--global-batch-size", str(rng.choice((8, 12, 16, 24, 32)))]
    world = rng.choice((2, 4, 6, 8, 12, 16))
    per_node = rng.choice([g for g in (1, 2, 4, 8) if world % g == 0])
    # mostly small degrees, so that many cases run; 3 and 8 to break divisibility
    degrees = tuple(rng.choice((1, 1, 1, 2, 2, 4, 3, 8)) for _ in range(4))  # tp, pp, ep, etp
    return flags, world, per_node, degrees


def _training_accepts(flags, world, degrees) -> str | None:
    """None when the checks pass, else training's message."""
    tp, pp, ep, etp = degrees
    args = parse_args([*flags, "--tensor-model-parallel-size", str(tp),
                       "--pipeline-model-parallel-size", str(pp),
                       "--expert-model-parallel-size", str(ep),
                       "--expert-tensor-parallel-size", str(etp),
                       *(["--sequence-parallel"] if tp > 1 else [])])
    try:
        dims = validate_parallel_dims(args, world)
        validate_model(args, dims)
        validate_batch(args, dims)
    except ConfigError as err:
        return str(err)
    return None


def _judged_case(rng: random.Random):
    flags, world, per_node, degrees = _random_case(rng)
    training = _training_accepts(flags, world, degrees)
    fits_node = per_node % degrees[0] == 0 and per_node % degrees[3] == 0
    return flags, world, per_node, degrees, training, fits_node


@pytest.mark.parametrize("seed", range(3))
def test_planner_and_training_agree_on_what_runs(seed):
    rng = random.Random(seed)
    runnable = 0
    for i in range(100):
        case = _judged_case(rng)
        while i % 2 == 0 and not (case[4] is None and case[5]):  # every other case runnable
            case = _judged_case(rng)
        flags, world, per_node, degrees, training, fits_node = case
        args = parse_args(flags)
        layout = Layout(world, per_node, *degrees)
        planner = layout_problems(layout, model_from_args(args), workload_from_args(args))
        expect_runnable = training is None and fits_node
        assert (not planner) == expect_runnable, (
            f"{layout} on {flags}: planner says {planner or 'runnable'}, training says "
            f"{training or 'runnable'}, TP/ETP inside a node of {per_node}: {fits_node}")
        runnable += expect_runnable
    assert 50 <= runnable < 100  # both sides of the rule exercised
