"""The planner's step-time model against measured training steps on the emulated testbed.

Launch (repo root, venv active; the testbed needs user + network namespaces)::

    # 16 configurations + 3 calibration runs at 0.4 / 1 / 4 Gbit/s: ~13 min on an idle
    # 2-core host (plus any wait for it to be idle)
    python bench/planner_validation.py --plot bench/results/planner_validation.png \\
        --wait-idle-s 1800 --retries 2
    python bench/planner_validation.py --quick --out /tmp/pv.json     # smoke run, ~1 min

What runs. Every configuration (:data:`CONFIGS`) is one short ``pretrain_moe.py --mock-data``
job on 2 nodes × 2 ranks of ``monta.testbed`` at its inter-node cap (small model: 2 layers,
hidden 512, 8 experts of FFN 64, sequence 512, 2 sequences per micro-batch and rank; fp32,
gloo); its step time is the median of TensorBoard's ``iteration-time`` over the iterations
after ``--skip`` (warm-up). The *same* flag list is parsed by ``pretrain_moe.py``'s parser and
given to the planner (``model_from_args``, ``workload_from_args``,
``candidate_from_args``), which predicts the step with :func:`monta.planner.costmodel.evaluate`
on the cluster spec ``tools/bench_comm.py`` measured at that cap
(``bench/results/cluster_testbed_{cap}gbit.yaml``).

Calibration (the only fitted numbers, :mod:`bench.planner_validation_fit`). The measured specs
describe links, not compute: the device section starts from the ``testbed_1gbit`` preset's
(efficiencies, small-GEMM penalty) and two of its constants are fitted on three dedicated runs,
none of them a validated configuration: ``peak_tflops`` so that TP1·EP1·DP4 (top-2, 1 Gbit/s:
every expert local, no MoE communication; its gradient all-reduce is priced from the links) is
predicted at its measured step, and ``launch_overhead_us`` (fixed cost per pipelined stage and
chunk: Python, gloo calls, bookkeeping) so that TP1·EP4 monta+dedup at 8 chunks minus the same
at 1 chunk (top-2, 4 Gbit/s, where chunk costs are largest next to the transfers) is predicted
as measured, and ``hop_overhead_us`` (fixed cost per MoNTA dispatcher hop, once per MoE block:
send plans, count-exchange syncs, index copies — and whatever else the α-β model misses for the
multi-hop path on this host) so that the 1-chunk run itself is (``--no-launch-fit`` keeps the
preset's launch and hop costs). Nothing is fitted per configuration.

Reported: per configuration the measured samples and median, the predicted step and its phase
breakdown, the error ``(predicted − measured) / measured``; the median and worst |error| against
the goals (≤ 15 %, ≤ 30 %); and *selection problems*: for every (cap, top-k) group of
configurations (same model and batch, different layout / dispatcher / dedup / chunks) "which is
fastest?" — the planner's pick (lowest prediction) succeeds when its measured step is within
5 % of the group's measured best. Host load is recorded per job as in ``bench/moe_ab.py``
(``clean: false`` when other processes disturbed a job; ``--wait-idle-s`` / ``--retries``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(_REPO))

from bench.planner_validation_fit import (  # noqa: E402
    CalibrationRun, calibrate, cluster_path, phases_ms, predict, selection_problems,
    spec_loader, summary,
)
from bench.harness import (  # noqa: E402
    REPO, add_output_args, comma_floats, result_header, write_result,
)
from bench.testbed_jobs import (  # noqa: E402
    LoadPolicy, add_load_args, exit_on_sigterm, load_record, median_after,
    testbed_unavailable, train_on_testbed, warn_if_loaded,
)
from monta.testbed import EXIT_UNAVAILABLE  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "planner_validation.json"
NODES, RANKS_PER_NODE = 2, 2


def cfg(cap: float, topk: int, layout: str, dispatcher: str, dedup: str | None = None,
        chunks: int | None = None) -> dict[str, Any]:
    """One configuration; ``layout`` is ``TP·EP·ETP`` as ``"1.4.1"``."""
    tp, ep, etp = (int(v) for v in layout.split("."))
    return {"cap_gbit": cap, "topk": topk, "tp": tp, "ep": ep, "etp": etp,
            "dispatcher": dispatcher, "node_dedup": dedup, "chunks": chunks}


# Each (cap, top-k) group is one selection problem. They span TP1 / TP2+SP, EP 2 (inside a node
# with ETP1, across nodes with ETP2) / EP4, every dispatcher, node dedup on/off, 1 and 4 chunks.
CONFIGS = [
    cfg(1, 8, "1.4.1", "alltoall"), cfg(1, 8, "1.4.1", "monta", "on", 1),
    cfg(1, 8, "1.4.1", "monta", "on", 4),
    cfg(1, 2, "1.4.1", "alltoall"), cfg(1, 2, "1.4.1", "monta", "off", 1),
    cfg(1, 2, "2.2.1", "alltoall"),
    cfg(0.4, 4, "2.2.2", "ds_tp"), cfg(0.4, 4, "2.2.2", "alltoall"),
    cfg(0.4, 4, "2.2.2", "monta", "off", 4),
    cfg(0.4, 8, "1.4.1", "alltoall"), cfg(0.4, 8, "1.4.1", "monta", "on", 4),
    cfg(4, 1, "1.4.1", "alltoall"), cfg(4, 1, "1.4.1", "monta", "off", 4),
    cfg(4, 4, "1.4.1", "alltoall"), cfg(4, 4, "1.4.1", "monta", "on", 4),
    cfg(4, 4, "2.2.2", "monta", "off", 1),
]
QUICK_CONFIGS = [cfg(1, 2, "1.4.1", "alltoall"), cfg(1, 2, "1.4.1", "monta", "off", 1)]
# calibration runs, none of them validated: EP1 has no MoE communication (→ peak_tflops); the
# same monta run at 1 and 8 chunks at the fastest cap, where chunk costs show (→ launch cost)
CALIBRATION = cfg(1, 2, "1.1.1", "alltoall")
LAUNCH_CALIBRATION = (cfg(4, 2, "1.4.1", "monta", "on", 1), cfg(4, 2, "1.4.1", "monta", "on", 8))


def label(c: dict) -> str:
    layout = f"TP{c['tp']}·EP{c['ep']}" + (f"·ETP{c['etp']}" if c["tp"] * c["etp"] > 1 else "")
    if c["dispatcher"] != "monta":
        return f"{layout} {c['dispatcher']}"
    return f"{layout} monta{'+dedup' if c['node_dedup'] == 'on' else ''} c{c['chunks']}"


def dispatcher_kind(c: dict) -> str:
    """alltoall, ds_tp, monta or monta+dedup (the plot's colours)."""
    if c["dispatcher"] != "monta":
        return c["dispatcher"]
    return "monta+dedup" if c["node_dedup"] == "on" else "monta"


def train_flags(args: argparse.Namespace, c: dict) -> list[str]:
    """``pretrain_moe.py`` flags of one configuration: what runs AND what the planner costs."""
    world = NODES * RANKS_PER_NODE
    flags = [
        "--mock-data", "--vocab-size", str(args.vocab_size), "--num-layers", str(args.layers),
        "--hidden-size", str(args.hidden), "--ffn-hidden-size", str(args.ffn_hidden),
        "--num-attention-heads", str(args.heads), "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size),
        # fixed tokens per step (micro-batch × world): TP2 runs DP2 with 2 micro-batches
        "--global-batch-size", str(args.micro_batch_size * world),
        "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
        "--num-experts", str(args.experts), "--moe-router-topk", str(c["topk"]),
        "--moe-router-load-balancing-type", "none",
        "--tensor-model-parallel-size", str(c["tp"]),
        "--expert-model-parallel-size", str(c["ep"]),
        "--expert-tensor-parallel-size", str(c["etp"]),
        "--moe-token-dispatcher-type", c["dispatcher"],
        "--train-iters", str(args.iters), "--log-interval", "1", "--eval-iters", "0",
        "--eval-interval", str(args.iters + 1), "--no-progress-bar"]
    if c["tp"] > 1:
        flags.append("--sequence-parallel")
    if c["topk"] == 1:  # megatron-core refuses top-1 with the softmax after the top-k
        flags.append("--moe-router-pre-softmax")
    if c["dispatcher"] == "monta":
        flags += ["--monta-node-dedup", c["node_dedup"], "--monta-chunks", str(c["chunks"])]
    return flags


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, c: dict, name: str, loads: list) -> dict[str, Any]:
    """One testbed job of configuration ``c``: its iteration times and counters."""
    run = train_on_testbed(train_flags(args, c), name=name, inter_gbit=c["cap_gbit"],
                           nodes=NODES, ranks_per_node=RANKS_PER_NODE, timeout_s=args.timeout,
                           policy=LoadPolicy.from_args(args, "planner_validation"), loads=loads)
    kept = run.after("iteration-time", args.skip)
    if not kept:
        raise RuntimeError(f"{name}: no iteration-time after step {args.skip} in TensorBoard "
                           f"(tags {sorted(run.scalars)})")
    fwd_dc: dict[int, float] = defaultdict(float)  # forward dispatch + combine, all layers
    for tag, series in run.scalars.items():
        if tag.startswith("moe-time/") and tag.endswith(("/dispatch-ms", "/combine-ms")):
            for s, value in series.items():
                fwd_dc[s] += value
    sample = {"iteration_s": kept, "job_seconds": run.seconds,
              "inter_bytes_per_step": median_after(
                  run.scalars.get("moe-comm/inter-bytes-per-step", {}), args.skip),
              "intra_bytes_per_step": median_after(
                  run.scalars.get("moe-comm/intra-bytes-per-step", {}), args.skip),
              "fwd_dispatch_combine_ms": median_after(fwd_dc, args.skip),
              "expert_load_max_over_mean": median_after(
                  run.scalars.get("expert-load/max-over-mean", {}), args.skip)}
    print(f"[planner_validation] {name}: {statistics.median(kept) * 1e3:.0f} ms/iteration "
          f"({run.seconds:.0f} s job)", flush=True)
    return sample


def merge_samples(runs: list[dict]) -> dict[str, Any]:
    every = [s for run in runs for s in run["iteration_s"]]
    return {"runs": runs, "samples_ms": [s * 1e3 for s in every],
            "measured_ms": statistics.median(every) * 1e3}


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
def row_for(c: dict, flags: list[str], measured: dict, plan) -> dict[str, Any]:
    predicted = plan.step_time_s * 1e3
    return {"label": label(c), "config": c, "dispatcher_kind": dispatcher_kind(c),
            "argv": flags, **measured, "predicted_ms": predicted,
            "error_pct": (predicted - measured["measured_ms"]) / measured["measured_ms"] * 100,
            "predicted_phases_ms": phases_ms(plan), "predicted_candidate": str(plan.candidate),
            "predicted_ep_comm_ms": plan.ep_comm_seconds() * 1e3,
            "predicted_link_bytes_per_rank": plan.link_bytes()}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny model, 1 Gbit/s, calibration + 2 configurations, "
                             "3 iterations")
    parser.add_argument("--caps", type=comma_floats, default=None,
                        help="only the configurations at these caps (Gbit/s); default all")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn-hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--iters", type=int, default=7, help="training iterations per job")
    parser.add_argument("--skip", type=int, default=2,
                        help="iterations dropped from the median (warm-up)")
    parser.add_argument("--reps", type=int, default=1,
                        help="jobs per configuration (the order reverses every repetition)")
    parser.add_argument("--cluster-dir", type=Path, default=REPO / "bench" / "results",
                        help="holds bench_comm's cluster_testbed_{cap}gbit.yaml")
    parser.add_argument("--no-launch-fit", action="store_true",
                        help="keep the preset's launch_overhead_us and hop_overhead_us (skip their "
                             "2 calibration runs)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per testbed job, seconds")
    add_load_args(parser)
    add_output_args(parser, DEFAULT_OUT, "predicted vs measured scatter")
    args = parser.parse_args(argv)
    args.configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.quick:  # a smoke run: sizes at which a job is mostly start-up
        args.layers, args.hidden, args.ffn_hidden, args.heads = 2, 64, 32, 4
        args.seq_length, args.iters, args.skip, args.no_launch_fit = 64, 3, 1, True
    if args.caps is not None:
        args.configs = [c for c in args.configs if c["cap_gbit"] in args.caps]
    if not args.configs:
        parser.error(f"no configuration at --caps {args.caps}")
    if args.iters <= args.skip:
        parser.error(f"--iters {args.iters} must exceed --skip {args.skip}")
    missing = [str(cluster_path(args.cluster_dir, c["cap_gbit"]))
               for c in args.configs + calibration_configs(args)
               if not cluster_path(args.cluster_dir, c["cap_gbit"]).is_file()]
    if missing:
        parser.error(f"no measured cluster spec {sorted(set(missing))}: run "
                     f"tools/bench_comm.py on the testbed at that cap (see its docstring)")
    return args


def preflight(args: argparse.Namespace) -> None:
    """``pretrain_moe.py``'s own local checks (flags, world size, megatron-core's config) for
    every run before the first job, so a bad configuration fails in seconds, not minutes in."""
    from monta.training.arguments import parse_args as pretrain_args

    with warnings.catch_warnings():  # megatron-core's import-time notes (Apex, TE) are noise here
        warnings.simplefilter("ignore")
        from monta.training.pretrain import preflight as pretrain_preflight

        for c in calibration_configs(args) + args.configs:
            try:
                pretrain_preflight(pretrain_args(train_flags(args, c)), NODES * RANKS_PER_NODE)
            except Exception as error:  # ConfigError, or anything megatron-core raises
                raise ValueError(f"{label(c)} at {c['cap_gbit']:g} Gbit/s top-{c['topk']} "
                                 f"cannot run: {error}") from error


def calibration_configs(args: argparse.Namespace) -> list[dict]:
    return [CALIBRATION] + ([] if args.no_launch_fit else list(LAUNCH_CALIBRATION))


def run_calibration(args: argparse.Namespace, loads: list) -> dict[str, Any]:
    """Measure the calibration runs and fit the device (module docstring)."""
    measured = {}
    for name, c in zip(("peak", "launch_0", "launch_1"), calibration_configs(args)):
        runs = [measure(args, c, f"calibration {c['cap_gbit']:g} Gbit/s top-{c['topk']} "
                                 f"{label(c)} rep {rep}", loads) for rep in range(args.reps)]
        measured[name] = {"config": c, "label": label(c), "argv": train_flags(args, c),
                          **merge_samples(runs)}
    cal = {name: CalibrationRun(m["argv"], m["config"]["cap_gbit"], m["measured_ms"] / 1e3)
           for name, m in measured.items()}
    launch = None if args.no_launch_fit else (cal["launch_0"], cal["launch_1"])
    result = calibrate(spec_loader(args.cluster_dir), cal["peak"], launch)
    for name, m in measured.items():
        result["runs"][name] |= m
    print(f"[planner_validation] calibrated {result['fitted']}: {result['before']} -> "
          f"{result['after']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if testbed_unavailable("planner_validation"):
        return EXIT_UNAVAILABLE
    from bench.planner_validation_report import markdown, plot

    preflight(args)
    exit_on_sigterm()
    policy = LoadPolicy.from_args(args, "planner_validation")
    start = time.perf_counter()
    loads: list[dict] = []
    warn_if_loaded(policy)
    # 1) calibration first: every prediction needs its device
    calibration = run_calibration(args, loads)
    # 2) the configurations, the order reversed every repetition
    runs: dict[int, list[dict]] = defaultdict(list)
    for rep in range(args.reps):
        order = list(enumerate(args.configs))
        for i, c in (order if rep % 2 == 0 else order[::-1]):
            runs[i].append(measure(args, c, f"{c['cap_gbit']:g} Gbit/s top-{c['topk']} "
                                            f"{label(c)} rep {rep}", loads))
    spec_of = spec_loader(args.cluster_dir)
    rows = []
    for i, c in enumerate(args.configs):
        flags = train_flags(args, c)
        plan = predict(flags, spec_of(c["cap_gbit"], calibration["device"]))
        rows.append(row_for(c, flags, merge_samples(runs[i]), plan))
    problems = selection_problems(rows)
    result = {
        **result_header("planner_validation", args),
        "method": "median iteration-time after --skip warm-up iterations vs "
                  "monta.planner.costmodel.evaluate on the same flags and bench_comm's "
                  "cluster spec of the cap; device calibrated on dedicated runs (calibration)",
        **load_record(loads, policy),
        "calibration": calibration, "rows": rows, "selection_problems": problems,
        "summary": summary(rows, problems),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    write_result("planner_validation", result, args, markdown, plot,
                 seconds=result["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
