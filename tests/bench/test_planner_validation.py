"""``bench/planner_validation.py``: its bookkeeping without the testbed (calibration, selection
problems, one flag list for the run and the prediction), and a smoke run of ``--quick`` on the
emulated testbed (calibration + 2 configurations at tiny sizes): the JSON's structure, positive
predictions that the same flags reproduce, errors and selection problems computed as documented.
Timings of so small a run on shared cores mean nothing and are not checked. The testbed part
skips with the testbed's reason where network namespaces are not allowed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `bench` is a folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

import monta.testbed as tb  # noqa: E402
from bench import planner_validation as pv  # noqa: E402
from bench import planner_validation_fit as fit  # noqa: E402
from monta.planner.plan import candidate_from_args  # noqa: E402
from monta.training.arguments import parse_args as pretrain_args  # noqa: E402

JOB_TIMEOUT_S = 150
QUICK_JOBS = 3  # calibration + 2 configurations


def test_every_config_flag_list_is_the_candidate_it_names():
    args = pv.parse_args([])
    for c in pv.CONFIGS + [pv.CALIBRATION]:
        margs = pretrain_args(pv.train_flags(args, c))
        cand = candidate_from_args(margs)
        assert (cand.tp, cand.ep, cand.etp, cand.dispatcher) == (c["tp"], c["ep"], c["etp"],
                                                                 c["dispatcher"])
        assert margs.moe_router_topk == c["topk"] and margs.sequence_parallel == (c["tp"] > 1)
        if c["dispatcher"] == "monta":
            assert (cand.node_dedup, cand.chunks) == (c["node_dedup"] == "on", c["chunks"])
    pv.preflight(args)  # pretrain_moe.py's own checks accept every run (ValueError if not)
    groups = {(c["cap_gbit"], c["topk"]) for c in pv.CONFIGS}
    assert len(pv.CONFIGS) >= 12 and len(groups) >= 6
    for c in (pv.CALIBRATION, *pv.LAUNCH_CALIBRATION):  # calibration runs are not validated
        assert c not in pv.CONFIGS


def test_calibration_reproduces_the_measured_steps():
    args = pv.parse_args([])
    spec_of = fit.spec_loader(args.cluster_dir)
    peak = fit.CalibrationRun(pv.train_flags(args, pv.CALIBRATION), 1.0, 1.5)
    one, many = (fit.CalibrationRun(pv.train_flags(args, c), c["cap_gbit"], s)
                 for c, s in zip(pv.LAUNCH_CALIBRATION, (1.6, 2.0)))
    cal = fit.calibrate(spec_of, peak, (one, many))
    assert cal["fitted"] == ["peak_tflops", "launch_overhead_us", "hop_overhead_us"]
    dev = cal["device"]
    assert fit.predict(peak.flags, spec_of(1.0, dev)).step_time_s == pytest.approx(1.5, rel=1e-4)
    # the 1-chunk run is predicted as measured through the hop cost
    assert fit.predict(one.flags, spec_of(4.0, dev)).step_time_s == pytest.approx(1.6, rel=1e-4)
    assert dev["hop_overhead_us"] > 0
    gap = (fit.predict(many.flags, spec_of(4.0, dev)).step_time_s
           - fit.predict(one.flags, spec_of(4.0, dev)).step_time_s)
    assert gap == pytest.approx(0.4, rel=1e-6) and dev["launch_overhead_us"] > 0
    assert cal["runs"]["peak"]["predicted_ms"] == pytest.approx(1500, rel=1e-4)
    # a slower host: a lower peak; chunks as cheap as the α's alone: no launch cost at all
    slow = fit.calibrate(spec_of, fit.CalibrationRun(peak.flags, 1.0, 3.0))
    assert slow["device"]["peak_tflops"] < dev["peak_tflops"]
    assert slow["fitted"] == ["peak_tflops"]
    fast = fit.CalibrationRun(many.flags, 4.0, 1.6)  # 8 chunks as fast as 1: below the α's
    assert fit.fit_launch(spec_of, dev, one, fast) == 0.0
    assert fit.fit_launch(spec_of, dev, one, fast, clamp=False) < 0
    noisy = fit.calibrate(spec_of, peak, (one, fast))
    assert noisy["after"]["launch_overhead_us"] == 0 > noisy["launch_overhead_us_unclamped"]
    assert cal["launch_overhead_us_unclamped"] is None and cal["hop_overhead_us_unclamped"] is None
    quick = fit.CalibrationRun(one.flags, 4.0, 0.01)  # faster than its links allow: no hop cost
    assert fit.fit_hop(spec_of, dev, quick) == 0.0 > fit.fit_hop(spec_of, dev, quick, clamp=False)
    with pytest.raises(ValueError, match="without any compute"):
        fit.calibrate(spec_of, fit.CalibrationRun(peak.flags, 1.0, 1e-4))  # < the all-reduce


def _row(label: str, cap: float, topk: int, measured: float, predicted: float) -> dict:
    return {"label": label, "config": {"cap_gbit": cap, "topk": topk}, "measured_ms": measured,
            "predicted_ms": predicted,
            "error_pct": (predicted - measured) / measured * 100}


def test_selection_problems_and_summary():
    rows = [_row("a", 1, 8, 100, 90), _row("b", 1, 8, 104, 80),  # pick b: 4 % off → right
            _row("c", 1, 2, 100, 90), _row("d", 1, 2, 110, 80),  # pick d: 10 % off → wrong
            _row("e", 4, 1, 50, 60)]  # alone: no problem
    problems = fit.selection_problems(rows)
    assert [(p["planner_pick"], p["measured_best"], p["success"]) for p in problems] == [
        ("d", "c", False), ("b", "a", True)]
    assert problems[0]["pick_over_best"] == pytest.approx(1.1)
    s = fit.summary(rows, problems)
    assert s["median_abs_error_pct"] == pytest.approx(20.0)  # |−10|, |−23.1|, |−10|, |−27.3|, 20
    assert s["worst_config"] == "d" and s["selection_success"] == 0.5
    assert s["goals_met"] == {"median_abs_error_pct": False, "worst_abs_error_pct": True,
                              "selection_success": False}


@pytest.fixture(scope="module")
def testbed() -> None:
    available, reason = tb.testbed_available()
    if not available:
        pytest.skip(reason)


def test_quick_run(testbed, tmp_path):
    out = tmp_path / "pv.json"
    # each job capped at JOB_TIMEOUT_S (the launcher stops its ranks), the script at what its
    # jobs may take (a launcher is killed 60 s after its own timeout)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "planner_validation.py"),
                           "--quick", "--timeout", str(JOB_TIMEOUT_S), "--out", str(out),
                           "--plot", str(tmp_path / "pv.png")],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=QUICK_JOBS * (JOB_TIMEOUT_S + 70) + 60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "planner_validation" and result["git_commit"]
    assert isinstance(result["clean"], bool)
    assert [e["job"].split()[0] for e in result["load_average"]["per_job"]
            if not e.get("discarded")][0] == "calibration"
    assert len(result["load_average"]["per_job"]) >= QUICK_JOBS
    cal = result["calibration"]
    assert cal["fitted"] == ["peak_tflops"]  # --quick keeps the preset's launch cost
    (peak,) = cal["runs"].values()
    assert peak["predicted_ms"] == pytest.approx(peak["measured_ms"], rel=1e-4)
    assert cal["device"]["peak_tflops"] > 0
    assert peak["measured_ms"] == pytest.approx(statistics.median(peak["samples_ms"]))
    assert len(result["rows"]) == len(pv.QUICK_CONFIGS)
    args = pv.parse_args(["--quick"])
    for row in result["rows"]:
        assert row["measured_ms"] > 0 and row["predicted_ms"] > 0
        assert len(row["samples_ms"]) == args.iters - args.skip
        assert row["measured_ms"] == pytest.approx(statistics.median(row["samples_ms"]))
        assert row["error_pct"] == pytest.approx(
            (row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"] * 100)
        assert sum(row["predicted_phases_ms"].values()) == pytest.approx(row["predicted_ms"])
        # the prediction is the planner's for the very flags that ran
        plan = fit.predict(row["argv"], fit.spec_loader(args.cluster_dir)(
            row["config"]["cap_gbit"], cal["device"]))
        assert plan.step_time_s * 1e3 == pytest.approx(row["predicted_ms"], rel=1e-9)
        assert row["runs"][0]["inter_bytes_per_step"] > 0  # EP4 spans both nodes
    (problem,) = result["selection_problems"]
    by_label = {r["label"]: r for r in result["rows"]}
    assert {c["label"] for c in problem["candidates"]} == set(by_label)
    assert problem["planner_pick"] == min(by_label.values(),
                                          key=lambda r: r["predicted_ms"])["label"]
    assert problem["measured_best"] == min(by_label.values(),
                                           key=lambda r: r["measured_ms"])["label"]
    ratio = by_label[problem["planner_pick"]]["measured_ms"] / \
        by_label[problem["measured_best"]]["measured_ms"]
    assert problem["pick_over_best"] == pytest.approx(ratio)
    assert problem["success"] == (ratio <= 1 + fit.SELECTION_TOLERANCE)
    summary = result["summary"]
    assert summary["worst_abs_error_pct"] == pytest.approx(
        max(abs(r["error_pct"]) for r in result["rows"]))
    assert summary["selection_problems"] == 1
    table = out.with_suffix(".md").read_text()
    assert all(r["label"] in table for r in result["rows"]) and "Selection" in table
