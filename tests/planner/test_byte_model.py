"""The byte model against bench/dispatch_bytes.py: its uniform-routing formulas exactly, and the
counters it measured (bench/results/dispatch_bytes.json) within a few percent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monta.planner.layout import Layout
from monta.planner.routing import Routing, expected_copies, p_hit, routing_from_obj
from monta.planner.volumes import moe_volume

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "dispatch_bytes.json"
MODES = {"alltoall": "alltoall", "monta/flat": "monta_flat", "monta/dedup": "monta_dedup",
         "ds_tp": "ds_tp"}


def _rows():
    data = json.loads(RESULTS.read_text())
    settings = data["settings"]
    for row in data["rows"]:
        c = row["config"]
        layout = Layout(c["world"], c["ranks_per_node"], c["tp"], 1, c["ep"], c["etp"])
        copies = expected_copies(layout, c["experts"], c["topk"])
        volume = moe_volume(MODES[row["dispatcher"]], layout, copies,
                            settings["tokens_per_rank"], settings["hidden"],
                            settings["bytes_per_element"], c["experts"], c["topk"])
        yield row, copies, volume, settings["tokens_per_rank"] * settings["hidden"] * settings[
            "bytes_per_element"]


def test_every_bench_config_is_covered():
    rows = [row for row, *_ in _rows()]
    assert len(rows) >= 136  # >= 34 configs x 4 dispatchers (the sweep grows over time)
    assert {row["dispatcher"] for row in rows} == set(MODES)


def test_uniform_expectation_equals_the_bench_formula_exactly():
    for row, copies, volume, row_bytes in _rows():
        inter = sum(t.inter_bytes for t in volume.dispatch) / row_bytes
        assert inter == pytest.approx(row["uniform_inter_copies_per_token"], rel=1e-12), (
            row["config"]["name"], row["dispatcher"])
        if row["design_approx_inter"] is not None:  # DESIGN §2's u − 1 is the E ≫ k limit
            assert copies.dedup_inter == pytest.approx(row["design_approx_inter"], rel=0.2)


def test_measured_inter_and_intra_copies_within_a_few_percent():
    """The bench's random router is not exactly uniform: inter copies are ≤ 3.6 % apart, intra
    copies (smaller numbers) ≤ 4.5 % or 0.011 copies."""
    for row, _, volume, row_bytes in _rows():
        where = (row["config"]["name"], row["dispatcher"])
        inter = sum(t.inter_bytes for t in volume.dispatch) / row_bytes
        intra = sum(t.intra_bytes for t in volume.dispatch) / row_bytes  # incl. TP/ETP gathers
        assert inter == pytest.approx(row["inter_copies_per_token"], rel=0.04, abs=0.01), where
        assert intra == pytest.approx(row["intra_copies_per_token"], rel=0.05, abs=0.015), where
        tp_gather = sum(t.intra_bytes for t in volume.dispatch if t.name == "tp_gather")
        assert tp_gather / row_bytes == pytest.approx(row["tp_gather_copies_per_token"])


def test_measured_routing_metadata():
    """probs fp32 + uint8 mask for E/EP (owner, expert-TP gather) or E/N (gateway) columns;
    stock alltoall sends one fp32 prob per copy (its counters leave out the probs it gathers over
    expert-TP, so those rows are not compared)."""
    compared = 0
    for row, _, volume, _ in _rows():
        if row["dispatcher"] == "alltoall" and row["config"]["etp"] > 1:
            continue
        tokens = row["distinct_tokens"] / row["config"]["world"]
        meta = sum(t.intra_meta + t.inter_meta for t in volume.dispatch) / tokens
        assert meta == pytest.approx(row["meta_bytes_per_token"], rel=0.04, abs=0.5), (
            row["config"]["name"], row["dispatcher"])
        compared += 1
    assert compared >= 100


def test_hand_computed_case_2_nodes_x_4_top2():
    """2x4 ranks, EP8, E8, top-2: each rank holds one expert.
    alltoall: 2 · 4/8 = 1 inter copy; flat: 4 remote ranks · P(hit one rank)
    = 4 · (1 − C(7,2)/C(8,2)) = 4 · 0.25 = 1;
    dedup: P(hit the other node) = 1 − C(4,2)/C(8,2) = 22/28;
    dedup fan-out: 3 · 0.25 locally + (4 · 0.25 − 22/28) at the gateway."""
    c = expected_copies(Layout(8, 4, 1, 1, 8, 1), 8, 2)
    assert c.alltoall_inter == pytest.approx(1.0) and c.flat_inter == pytest.approx(1.0)
    assert c.dedup_inter == pytest.approx(22 / 28)
    assert c.dedup_intra == pytest.approx(0.75 + 1.0 - 22 / 28)
    assert c.rows_at_owners == pytest.approx(8 * 0.25) and c.rank_imbalance == pytest.approx(1)


def test_histogram_routing():
    uniform = expected_copies(Layout(8, 4, 1, 1, 8, 1), 8, 2)
    flat_hist = expected_copies(Layout(8, 4, 1, 1, 8, 1), 8, 2, Routing(((0.125,) * 8,), "x"))
    assert flat_hist == uniform
    # all load on node 0's experts: nothing needs node 1 from node 0, and everything from node 1
    skew = routing_from_obj([1, 1, 1, 1, 0, 0, 0, 0])
    c = expected_copies(Layout(8, 4, 1, 1, 8, 1), 8, 2, skew)
    assert c.alltoall_inter == pytest.approx(0.5 * 2)  # half the sources send both picks over
    assert c.rank_imbalance == pytest.approx(2.0) and c.node_imbalance == pytest.approx(2.0)
    assert p_hit(0.5, 8, 2) == pytest.approx(1 - 6 / 28)  # exact hypergeometric when uniform
    tb = routing_from_obj({"expert-load/layer2/expert1": 3, "expert-load/layer2/expert0": 1,
                           "expert-load/layer1/expert0": 1, "expert-load/layer1/expert1": 1})
    assert tb.layers == ((0.5, 0.5), (0.25, 0.75))
    with pytest.raises(ValueError, match="has \\[2\\] experts per layer, the model has 8"):
        tb.fractions(8)
