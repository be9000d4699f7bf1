"""``tune``: the dispatcher times its options, every rank picks the same one, and every pass —
while trying candidates and after choosing — computes megatron's MoE function exactly."""

from __future__ import annotations

import pytest
import torch

from monta.dispatch.autotune import (
    CHUNK_OPTIONS,
    CONFIRM_ROUNDS,
    STOCK,
    TRIALS,
    DispatchTuner,
    Setting,
)
from monta.dispatch.monta_dispatcher import DispatchOptions, _or_stock
from monta.testing import run_distributed
from monta.testing.moe_layer_check import (
    MoECase,
    MoELayout,
    MoEShape,
    check_against_reference,
    run_mixed_cases,
)



def test_tuner_takes_turns_then_keeps_the_fastest_forward_when_there_is_no_backward():
    # forward durations per candidate, trial by trial: dedup/c4 is fastest on its second trial
    durations = {Setting(False, 1): [5, 4], Setting(False, 4): [6, 3], Setting(True, 1): [9, 9],
                 Setting(True, 4): [7, 1]}
    now = [0.0]
    tuner = DispatchTuner.for_options([False, True], [1, 4], group=None, trials=2)
    tuner.clock = lambda: now[0]
    seen = []

    def forward():  # the layer's forward "takes" its candidate's duration
        setting = tuner.setting()
        seen.append(setting)
        now[0] += durations[setting][min(seen.count(setting), 2) - 1]
        return len(seen)

    outputs = [tuner.timed_forward(forward, torch.device("cpu")) for _ in range(8)]
    assert outputs == list(range(1, 9))
    assert seen == tuner.candidates * 2, "round-robin, one forward per turn"
    assert tuner.chosen is None, "decided at the next forward, once every trial is in"
    tuner.timed_forward(forward, torch.device("cpu"))
    assert tuner.chosen == Setting(True, 4) and tuner.basis == "forward"
    assert tuner.times[Setting(False, 1)] == 4 and tuner.times[Setting(True, 4)] == 1
    assert seen[-1] == Setting(True, 4) and tuner.setting() == Setting(True, 4)
    assert tuner.report().startswith("dedup/c4 (forward ms")


def test_tuner_times_forward_and_backward_when_autograd_runs():
    # c4's forward is faster but its backward slower: the sum decides (forward alone would
    # pick c4)
    forward_s = {Setting(False, 1): 2.0, Setting(False, 4): 1.0}
    backward_s = {Setting(False, 1): 3.0, Setting(False, 4): 5.0}
    now = [0.0]
    tuner = DispatchTuner.for_options([False], [1, 4], group=None, trials=1)
    tuner.clock = lambda: now[0]
    for _ in range(3):
        setting = tuner.setting()
        x = torch.ones(3, requires_grad=True)

        def forward():
            now[0] += forward_s[setting]
            return x * 2

        out = tuner.timed_forward(forward, torch.device("cpu"), inputs=x)

        def backward_takes_time(grad):
            now[0] += backward_s[setting]
            return grad

        out.register_hook(backward_takes_time)  # runs between the tuner's two marks
        out.sum().backward()
    assert tuner.step_s == {Setting(False, 1): 5.0, Setting(False, 4): 6.0}
    assert tuner.chosen == Setting(False, 1) and tuner.basis == "forward + backward"


def test_stock_is_the_last_candidate_and_can_win():
    tuner = DispatchTuner.for_options([False], [1, 2], group=None, trials=1, with_stock=True)
    assert tuner.candidates == [Setting(False, 1), Setting(False, 2), STOCK]
    now = [0.0]
    tuner.clock = lambda: now[0]
    for seconds in (3.0, 2.0, 1.0, 0.0):  # stock, tried last, is fastest; the 4th pass decides
        tuner.timed_forward(lambda: now.__setitem__(0, now[0] + seconds), torch.device("cpu"))
    assert tuner.chosen == STOCK and str(STOCK) == "stock"


def _tune_with_durations(seconds_of: dict) -> DispatchTuner:
    """flat/c1 vs stock, one trial each, then (if flat/c1 is picked) the head-to-head rounds;
    each forward "takes" its setting's duration."""
    tuner = DispatchTuner.for_options([False], [1], group=None, trials=1, with_stock=True)
    now = [0.0]
    tuner.clock = lambda: now[0]
    def forward():  # the layer asks the tuner what to run once the pass has started
        now[0] += seconds_of[tuner.setting()]

    while tuner.chosen is None:
        tuner.timed_forward(forward, torch.device("cpu"))
    return tuner


def test_stock_wins_ties_within_the_noise_margin():
    flat = Setting(False, 1)
    assert _tune_with_durations({flat: 0.97, STOCK: 1.0}).chosen == STOCK  # 3 %: within it
    tuner = _tune_with_durations({flat: 0.90, STOCK: 1.0})  # 10 % faster: a real win
    assert tuner.chosen == flat and tuner.confirmation == pytest.approx((0.90, 1.0))
    assert _tune_with_durations({flat: 1.10, STOCK: 1.0}).chosen == STOCK


def test_a_pick_that_loses_head_to_head_falls_back_to_stock():
    flat = Setting(False, 1)
    seen = []
    tuner = DispatchTuner.for_options([False], [1], group=None, trials=1, with_stock=True)
    now = [0.0]
    tuner.clock = lambda: now[0]
    trial_s, confirm_s = {flat: 0.8, STOCK: 1.0}, {flat: 1.15, STOCK: 1.0}
    def forward():
        seen.append(tuner.setting())
        now[0] += (trial_s if tuner.provisional is None else confirm_s)[seen[-1]]

    while tuner.chosen is None:
        tuner.timed_forward(forward, torch.device("cpu"))
    # trials, then the pick and stock alternate, stock first, CONFIRM_ROUNDS times each; the
    # pass that decides runs the decision
    assert seen == [flat, STOCK] + [STOCK, flat] * CONFIRM_ROUNDS + [STOCK]
    assert tuner.chosen == STOCK and tuner.provisional == flat
    assert tuner.confirmation == pytest.approx((1.15, 1.0))
    assert "flat/c1 rejected head to head" in tuner.report()


def test_calls_go_to_megatron_while_stock_is_tried_or_chosen():
    class Dispatcher:
        def __init__(self, stock, tuner):
            self.stock, self.tuner = stock, tuner

        @_or_stock
        def token_dispatch(self, x):
            return ("monta", x)

    class Megatron:
        def token_dispatch(self, x):
            return ("stock", x)

    tuner = DispatchTuner.for_options([False], [1], group=None, trials=1, with_stock=True)
    dispatcher = Dispatcher(Megatron(), tuner)  # candidates: flat/c1, stock
    assert dispatcher.token_dispatch(1) == ("monta", 1)  # first candidate: flat/c1
    tuner.runs = 1
    assert dispatcher.token_dispatch(2) == ("stock", 2)  # trying stock
    tuner.chosen = Setting(False, 1)
    assert dispatcher.token_dispatch(3) == ("monta", 3)
    tuner.chosen = STOCK
    assert dispatcher.token_dispatch(4) == ("stock", 4)
    assert Dispatcher(None, tuner).token_dispatch(5) == ("monta", 5)  # no fallback built


def test_single_candidate_is_chosen_without_trials():
    tuner = DispatchTuner.for_options([False], [2], group=None)
    assert tuner.chosen == Setting(False, 2)


def test_options_accept_tune_and_reject_nonsense():
    assert DispatchOptions(node_dedup="tune", chunks="tune").chunks == "tune"
    with pytest.raises(ValueError, match="monta-chunks"):
        DispatchOptions(chunks="many")
    with pytest.raises(ValueError, match="node_dedup"):
        DispatchOptions(node_dedup="maybe")


@pytest.mark.parametrize("layout", [MoELayout(1, 4, 1), MoELayout(2, 2, 2)],
                         ids=lambda layout: layout.name)
def test_tuning_layer_matches_reference_and_ranks_agree(layout):
    shape = MoEShape(num_experts=8, hidden_size=16, ffn_hidden_size=8 * layout.etp,
                     seq_per_shard=12, micro_batch_size=2)
    case = MoECase("tune", topk=4, pre_softmax=False, seed=7)
    options = DispatchOptions(node_dedup="tune", chunks="tune")
    # 2 nodes of 2 ranks: dedup on/off × chunk counts, and megatron's stock path
    candidates = 2 * len(CHUNK_OPTIONS) + 1
    # every trial, the head-to-head confirmation if a MoNTA option won, one pass with the choice
    passes = TRIALS * candidates + 2 * CONFIRM_ROUNDS + 1
    items = [(case, shape, ("monta", options), 2, passes)]
    got = run_distributed(run_mixed_cases, layout.world_size, layout, items, timeout_s=300)[0][0]
    assert got["pass_spread"] < 1e-5, "a candidate computed something else"
    assert len(set(got["tuned"])) == 1 and got["tuned"][0] is not None, got["tuned"]
    assert check_against_reference(layout, got, shape, require_drops=False) > 0
