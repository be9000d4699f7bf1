"""bench/gpu_timing.py's interleaving: every variant takes places spread over the whole round."""

import statistics

import pytest
import torch

from bench.gpu_timing import Timer, rotated, time_interleaved


@pytest.mark.parametrize("items,rounds", [(12, 6), (13, 6), (4, 6), (3, 3), (5, 1)])
def test_rounds_spread_each_item_over_the_places(items, rounds):
    orders = [rotated(list(range(items)), r, rounds) for r in range(rounds)]
    for order in orders:
        assert sorted(order) == list(range(items))  # a permutation, nothing lost
    places = {i: [order.index(i) for order in orders] for i in range(items)}
    if rounds <= items:  # no place taken twice by one item
        assert all(len(set(p)) == rounds for p in places.values())
    # mean places differ by at most the stride: no item kept early or late throughout
    stride = max(items // rounds, 1)
    means = [statistics.mean(p) for p in places.values()]
    assert max(means) - min(means) <= stride


def test_a_shift_of_one_would_keep_the_first_items_late():
    # the order the stride replaced: item 0 of 12 in 6 rounds ran at places 0, 11, 10, 9, 8, 7
    by_one = [rotated(list(range(12)), r) for r in range(6)]
    assert [order.index(0) for order in by_one] == [0, 11, 10, 9, 8, 7]
    spread = [rotated(list(range(12)), r, 6) for r in range(6)]
    assert [order.index(0) for order in spread] == [0, 10, 8, 6, 4, 2]


def test_interleaved_rounds_time_every_variant_on_cpu():
    calls = []
    variants = {name: ("torch", lambda name=name: calls.append(name)) for name in "abcd"}
    samples, errors = time_interleaved(variants, Timer(torch.device("cpu")),
                                       rounds=2, reps=3)
    assert errors == {} and all(len(t) == 6 for t in samples.values())
    # round 0: 3 warm-up calls + 3 timed each, from a; round 1 (1 warm-up + 3 timed each)
    # starts two variants on (4 variants, 2 rounds)
    assert calls[:24] == [name for name in "abcd" for _ in range(6)]
    assert calls[24:] == [name for name in "cdab" for _ in range(4)]
