"""``tune``: the dispatcher times its options, every rank picks the same one, and every pass —
while trying candidates and after choosing — computes megatron's MoE function exactly."""

from __future__ import annotations

import pytest
import torch

from monta.dispatch.autotune import CHUNK_OPTIONS, DispatchTuner, Setting
from monta.dispatch.monta_dispatcher import DispatchOptions
from monta.testing import run_distributed
from monta.testing.moe_layer_check import (
    MoECase,
    MoELayout,
    MoEShape,
    check_against_reference,
    run_mixed_cases,
)



def test_tuner_tries_each_candidate_then_keeps_the_fastest():
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
    assert seen == [c for c in tuner.candidates for _ in range(2)], "fixed order, trials each"
    assert tuner.chosen == Setting(True, 4)
    assert tuner.times[Setting(False, 1)] == 4 and tuner.times[Setting(True, 4)] == 1
    tuner.timed_forward(forward, torch.device("cpu"))
    assert seen[-1] == Setting(True, 4) and tuner.setting() == Setting(True, 4)
    assert tuner.report().startswith("dedup/c4")


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
    candidates = 2 * len(CHUNK_OPTIONS)  # 2 nodes of 2 ranks: dedup on/off × chunk counts
    passes = 2 * candidates + 1  # every trial, then one pass with the choice
    items = [(case, shape, ("monta", options), 2, passes)]
    got = run_distributed(run_mixed_cases, layout.world_size, layout, items, timeout_s=300)[0][0]
    assert got["pass_spread"] < 1e-5, "a candidate computed something else"
    assert len(set(got["tuned"])) == 1 and got["tuned"][0] is not None, got["tuned"]
    assert check_against_reference(layout, got, shape, require_drops=False) > 0
