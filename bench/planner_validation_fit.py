"""Predictions, calibration and scoring of ``bench/planner_validation.py`` (pure Python: no
testbed, no torch.distributed).

* :func:`predict`: the planner's plan for a ``pretrain_moe.py`` flag list, on a cluster spec;
* :func:`calibrate`: the device constants the measured cluster specs lack, from dedicated
  calibration runs (never from validated configurations): ``peak_tflops`` so that a run
  without MoE communication is predicted at its measured step, and optionally
  ``launch_overhead_us`` (the model's fixed cost per pipelined stage and chunk) so that the
  step-time *difference* between a monta run at 1 chunk and the same at N chunks is predicted
  as measured — the difference cancels the bandwidth terms both runs share — and
  ``hop_overhead_us`` (fixed cost per dispatcher hop, once per MoE block) so that the 1-chunk
  run itself is predicted as measured (a node-dedup run: four hops per block, the most);
* :func:`selection_problems`, :func:`summary`: the scores.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

BASE_DEVICE = "testbed_1gbit"  # preset whose device section the calibration starts from
SELECTION_TOLERANCE = 0.05  # a pick within 5 % of the measured best counts as right
GOALS = {"median_abs_error_pct": 15.0, "worst_abs_error_pct": 30.0, "selection_success": 0.9}
SpecOf = Callable[[float, dict], Any]  # (cap Gbit/s, device fields) -> ClusterSpec


def cluster_path(cluster_dir: Path, cap: float) -> Path:
    return cluster_dir / f"cluster_testbed_{cap:g}gbit.yaml"


def spec_loader(cluster_dir: Path) -> SpecOf:
    """``(cap, device) -> ClusterSpec``: bench_comm's measured links of that cap with
    ``device`` as the device section (the measured specs have none)."""
    from monta.planner.cluster import load_cluster

    return lambda cap, device: load_cluster(cluster_path(cluster_dir, cap), overrides=device)


def base_device() -> dict[str, Any]:
    from monta.planner.cluster import load_cluster

    return dataclasses.asdict(load_cluster(BASE_DEVICE).device)


def predict(flags: list[str], cluster) -> Any:
    """The planner's :class:`~monta.planner.plan.Plan` for the run ``flags`` describe: the
    model, batch, layout and dispatcher all come from ``pretrain_moe.py``'s own parser."""
    from monta.planner.costmodel import PlanContext, evaluate
    from monta.planner.model import model_from_args, workload_from_args
    from monta.planner.plan import candidate_from_args
    from monta.training.arguments import parse_args

    margs = parse_args(flags)
    ctx = PlanContext(cluster, model_from_args(margs), workload_from_args(margs),
                      distributed_optimizer=margs.use_distributed_optimizer)
    return evaluate(candidate_from_args(margs), ctx)


def phases_ms(plan) -> dict[str, float]:
    return {name: seconds * 1e3 for name, seconds in plan.seconds().items() if seconds}


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CalibrationRun:
    """A measured run the calibration fits to."""

    flags: list[str]
    cap: float
    measured_s: float


def fit_peak(spec_of: SpecOf, device: dict, run: CalibrationRun) -> float:
    """``peak_tflops`` at which ``run`` is predicted at its measurement. The predicted step
    falls monotonically with the peak (compute shrinks, the links stay): bisect in log space.

    Raises:
        ValueError: even an infinite peak leaves a slower step (the links alone would take
            longer than the measurement: the spec cannot describe this host).
    """
    def step(peak: float) -> float:
        return predict(run.flags, spec_of(run.cap, device | {"peak_tflops": peak})).step_time_s

    lo, hi = 1e-6, 1e6  # TFLOP/s
    if step(hi) >= run.measured_s:
        raise ValueError(f"calibration: the planner predicts {step(hi) * 1e3:.0f} ms without "
                         f"any compute, more than the measured {run.measured_s * 1e3:.0f} ms")
    while hi / lo > 1 + 1e-9:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if step(mid) > run.measured_s else (lo, mid)
    return math.sqrt(lo * hi)


def _solve_linear(predicted: Callable[[float], float], target: float, clamp: bool,
                  flat: str) -> float:
    """The x ≥ 0 (or any x, without ``clamp``) at which ``predicted(x)``, linear and rising in
    x, equals ``target``: two evaluations give the line. ValueError ``flat`` if it does not
    rise."""
    slope = (predicted(1000.0) - predicted(0.0)) / 1000.0
    if slope <= 0:
        raise ValueError(f"calibration: {flat} (slope {slope})")
    fitted = (target - predicted(0.0)) / slope
    return max(0.0, fitted) if clamp else fitted


def fit_launch(spec_of: SpecOf, device: dict, one: CalibrationRun, many: CalibrationRun,
               clamp: bool = True) -> float:
    """``launch_overhead_us`` at which ``many`` − ``one`` (the same run at more chunks) is
    predicted as measured. The prediction is linear in it (``c · L`` per MoE block), so two
    evaluations give the line; clamped at 0 (unless ``clamp`` is False) when the chunks cost
    less than the model's α's alone — on a quiet host that does not happen, on a busy one the
    difference of two noisy steps can even be negative."""
    def gap(launch_us: float) -> float:
        dev = device | {"launch_overhead_us": launch_us}
        return (predict(many.flags, spec_of(many.cap, dev)).step_time_s
                - predict(one.flags, spec_of(one.cap, dev)).step_time_s)

    return _solve_linear(gap, many.measured_s - one.measured_s, clamp,
                         "more chunks do not add launch costs in the model: the launch runs "
                         "must differ in --monta-chunks")


def fit_hop(spec_of: SpecOf, device: dict, run: CalibrationRun, clamp: bool = True) -> float:
    """``hop_overhead_us`` at which ``run`` (with MoE hops) is predicted at its measurement;
    the prediction is linear in it. Clamped at 0 like :func:`fit_launch`."""
    def step(hop_us: float) -> float:
        return predict(run.flags, spec_of(run.cap, device | {"hop_overhead_us": hop_us})
                       ).step_time_s

    return _solve_linear(step, run.measured_s, clamp,
                         "the hop-cost run has no dispatcher hops (EP = ETP = 1?)")


FITTED = ("peak_tflops", "launch_overhead_us", "hop_overhead_us")


def calibrate(spec_of: SpecOf, peak_run: CalibrationRun,
              launch_runs: tuple[CalibrationRun, CalibrationRun] | None = None,
              ) -> dict[str, Any]:
    """The calibrated device section (module docstring) and how it was found. The peak moves
    the other runs' compute a little and the hop cost is fitted on the launch pair's first run
    after the launch cost, so a few rounds of fitting in turn converge."""
    device = base_device()
    before = dict(device)
    for _ in range(8 if launch_runs else 1):
        device = device | {"peak_tflops": fit_peak(spec_of, device, peak_run)}
        if launch_runs:
            device = device | {"launch_overhead_us": fit_launch(spec_of, device, *launch_runs)}
            device = device | {"hop_overhead_us": fit_hop(spec_of, device, launch_runs[0])}
    clamped = None
    if launch_runs and device["launch_overhead_us"] == 0.0:
        clamped = fit_launch(spec_of, device, *launch_runs, clamp=False)
    hop_clamped = None
    if launch_runs and device["hop_overhead_us"] == 0.0:
        hop_clamped = fit_hop(spec_of, device, launch_runs[0], clamp=False)
    runs = [("peak", peak_run)] + [(f"launch_{i}", r) for i, r in enumerate(launch_runs or ())]
    predicted = {name: predict(r.flags, spec_of(r.cap, device)) for name, r in runs}
    return {"device": device, "base_device": BASE_DEVICE,
            "fitted": list(FITTED if launch_runs else FITTED[:1]),
            "before": {k: before[k] for k in FITTED},
            "after": {k: device[k] for k in FITTED},
            "launch_overhead_us_unclamped": clamped,
            "hop_overhead_us_unclamped": hop_clamped,
            "runs": {name: {"measured_ms": r.measured_s * 1e3,
                            "predicted_ms": predicted[name].step_time_s * 1e3,
                            "phases_ms": phases_ms(predicted[name])} for name, r in runs}}


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def selection_problems(rows: list[dict]) -> list[dict]:
    """One problem per (cap, top-k) group of ≥ 2 configurations: the planner's pick is the
    group's lowest prediction; right when its measured step is within SELECTION_TOLERANCE of
    the group's measured best."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["config"]["cap_gbit"], row["config"]["topk"])].append(row)
    problems = []
    for (cap, topk), members in sorted(groups.items()):
        if len(members) < 2:
            continue
        pick = min(members, key=lambda r: r["predicted_ms"])
        best = min(members, key=lambda r: r["measured_ms"])
        ratio = pick["measured_ms"] / best["measured_ms"]
        problems.append({
            "question": f"{cap:g} Gbit/s, top-{topk}: which of {len(members)} is fastest?",
            "cap_gbit": cap, "topk": topk,
            "candidates": [{"label": r["label"], "measured_ms": r["measured_ms"],
                            "predicted_ms": r["predicted_ms"]} for r in members],
            "planner_pick": pick["label"], "measured_best": best["label"],
            "pick_over_best": ratio, "success": ratio <= 1 + SELECTION_TOLERANCE})
    return problems


def summary(rows: list[dict], problems: list[dict]) -> dict[str, Any]:
    errors = [abs(r["error_pct"]) for r in rows]
    won = sum(p["success"] for p in problems)
    out = {"configs": len(rows), "median_abs_error_pct": statistics.median(errors),
           "worst_abs_error_pct": max(errors),
           "worst_config": max(rows, key=lambda r: abs(r["error_pct"]))["label"],
           "selection_problems": len(problems), "selection_successes": won,
           "selection_success": won / len(problems) if problems else None, "goals": GOALS}
    out["goals_met"] = {
        "median_abs_error_pct": out["median_abs_error_pct"] <= GOALS["median_abs_error_pct"],
        "worst_abs_error_pct": out["worst_abs_error_pct"] <= GOALS["worst_abs_error_pct"],
        "selection_success": bool(problems) and won / len(problems)
        >= GOALS["selection_success"]}
    return out
