"""A/B of the MoE layer's dispatchers on the emulated multi-node testbed: wall time and link bytes.

Launch (repo root, venv active; the testbed needs user + network namespaces)::

    # caps 0.4, 1, 4 Gbit/s + training: ~23 min on an idle 2-core host
    python bench/moe_ab.py --plot bench/results/moe_ab.png --wait-idle-s 1800 --retries 2
    python bench/moe_ab.py --quick              # smoke run: 1 Gbit/s, top-2/8, 2 rounds
    python bench/moe_ab.py --caps 1 --no-train --out /tmp/moe_ab.json

Writes ``bench/results/moe_ab.json`` (config, machine, git commit, load averages, every sample)
and the tables as Markdown next to it (``.md``), and prints them. Measure only on an idle
machine (2 cores shared with other work turn the timings into noise): per job the run records
the 1-minute load average before and after, and the cores *other* processes kept busy meanwhile
(host busy time from /proc/stat minus this process tree's CPU time); the result says
``clean: false`` when the load average before the first job exceeds ``--max-load`` or other
processes used more than ``--max-foreign-cores`` during any job. ``--wait-idle-s`` waits for a
quiet host before each job.

What runs. One testbed job per inter-node cap (N nodes × G ranks, namespaces joined by
tbf-capped veths, see ``monta/testbed``); inside it ``bench/moe_ab_worker.py`` builds, per
parallel layout and top-k, one megatron-core MoE layer per candidate (same seed: same router,
same experts, same routing, checked by digest), and times forward + backward of each on the same
T tokens × h fp32 per rank, interleaved (every candidate once per round, start rotated) and
repeated; medians are reported. Candidates:

* layout TP1·EP4 (default; experts spread over both nodes, so node de-duplication has copies to
  remove): stock ``alltoall`` (megatron-core's dispatcher + counters) and ``monta`` with node
  dedup off/on × chunks 1/2/4/8, and ``monta/tune`` (``--monta-node-dedup tune --monta-chunks
  tune``: it times the eight options in its warm-up forwards and keeps the fastest — the one a
  user gets without knowing the network; its pick is in the table). ``ds_tp`` is left out here:
  with TP = 1 it *is* monta/flat/c1;
* layout TP2·EP2·ETP2 (tensor parallel inside a node; each node holds one EP rank, so dedup
  has nothing to remove): ``ds_tp`` (DeepSpeed-style: tokens replicated over TP, every TP rank
  sends all of them), stock ``alltoall``, ``monta`` TP-sharded with chunks 1 and 8, and
  ``monta/tune`` (chunks tuned; dedup has nothing to remove).

Reported per case:

* ``layer ms``: median of forward + backward of the layer (max over ranks of end − start);
* ``comm ms`` = layer ms − the median of a *no-comm* reference run in the same rounds: the same
  layer with EP = TP = 1 on single-rank process groups (all experts local, megatron's stock
  permutation, no collectives; the same routing and expert FLOPs per rank in expectation). So
  comm ms is dispatch + combine, forward and backward, *including* the dispatcher's own
  bookkeeping (plans, index ops) and minus whatever the candidate overlaps with compute. The
  ``monta.dispatch.stats`` phase seconds are in the JSON too (``fwd_dispatch_combine_ms``) but
  cover the forward only, and with chunks > 1 they include the experts (one number for the
  pipeline), so the tables use the subtraction;
* ``inter MB`` / ``intra MB``: payload bytes of one forward + backward summed over ranks, from
  :mod:`monta.comm`'s counters (router probabilities and masks, ``/meta``, separately in the
  JSON);
* ratios vs stock ``alltoall`` of the same cap, layout and top-k: layer speedup, comm speedup,
  inter bytes.

Then a short full-training comparison (``pretrain_moe.py --mock-data``, ``--train-iters``
iterations, TP1·EP4, stock ``alltoall`` vs ``monta`` with ``--train-monta-args``) at top-k
``--train-topks`` on the ``--train-cap`` link, alternating the two ``--train-reps`` times;
``iteration-time`` and ``moe-comm/inter-bytes-per-step`` are read from TensorBoard (median over
the iterations after ``--train-skip``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(_REPO))

from bench.harness import (  # noqa: E402
    REPO, add_output_args, comma_floats, comma_ints, result_header, write_result,
)
from bench.testbed_jobs import (  # noqa: E402
    LoadPolicy, accounted, add_load_args, exit_on_sigterm, load_record, median_after,
    testbed_env, testbed_unavailable, train_on_testbed, warn_if_loaded,
)
from bench.moe_ab_report import markdown, plot  # noqa: E402
from monta.testbed import EXIT_UNAVAILABLE  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "moe_ab.json"
STOCK = "alltoall"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def monta_candidate(node_dedup: str, chunks: int | str) -> dict[str, Any]:
    kind = {"on": "dedup", "off": "flat", "tune": "tune"}[node_dedup]
    label = "monta/tune" if kind == "tune" else f"monta/{kind}/c{chunks}"
    return {"label": label, "dispatcher": "monta", "node_dedup": node_dedup, "chunks": chunks}


TUNE = monta_candidate("tune", "tune")


def layouts(names: list[str], chunks: list[int]) -> list[dict[str, Any]]:
    """The parallel layouts and their candidates (module docstring)."""
    known = {
        "tp1ep4": {"name": "TP1·EP4", "tp": 1, "ep": 4, "etp": 1, "candidates": [
            {"label": STOCK, "dispatcher": STOCK},
            *[monta_candidate(d, c) for d in ("off", "on") for c in chunks], TUNE]},
        "tp2ep2etp2": {"name": "TP2·EP2·ETP2", "tp": 2, "ep": 2, "etp": 2, "candidates": [
            {"label": "ds_tp", "dispatcher": "ds_tp"}, {"label": STOCK, "dispatcher": STOCK},
            *[monta_candidate("off", c) for c in sorted({1, max(chunks)})], TUNE]},
    }
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown --layouts {bad}; choose from {sorted(known)}")
    return [known[n] for n in names]


def worker_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"seed": args.seed, "hidden": args.hidden, "ffn_hidden": args.ffn_hidden,
            "experts": args.experts, "tokens_per_rank": args.tokens, "reps": args.reps,
            "topks": args.topks, "pg_timeout_s": args.timeout,
            "layouts": layouts(args.layouts, args.chunks)}


# --------------------------------------------------------------------------------------------
# Running the jobs
# --------------------------------------------------------------------------------------------
def run_layer_job(args: argparse.Namespace, cap: float, config: dict, loads: list) -> dict:
    from monta.testbed import run_on_testbed

    with tempfile.TemporaryDirectory(prefix="moe-ab-") as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        cfg_path.write_text(json.dumps(config))
        result = accounted(f"layers cap {cap:g}", _policy(args), loads, lambda: run_on_testbed(
            [sys.executable, "-m", "bench.moe_ab_worker", "--config", str(cfg_path), "--out",
             str(out_path)], nodes=args.nodes, ranks_per_node=args.ranks_per_node,
            inter_gbit=cap, timeout_s=args.timeout, env=testbed_env(), cwd=REPO))
        seconds = loads[-1]["seconds"]
        if result.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"layer job at {cap:g} Gbit/s failed (exit {result.returncode})"
                               f":\n{result.output[-4000:]}")
        data = json.loads(out_path.read_text())
    data["job_seconds"] = seconds
    data["veth_bytes"] = result.link_bytes
    return data


def _policy(args: argparse.Namespace) -> LoadPolicy:
    return LoadPolicy.from_args(args, "moe_ab")


def train_flags(args: argparse.Namespace, topk: int, dispatcher: str) -> list[str]:
    """``pretrain_moe.py`` flags of one training run (the TensorBoard dir is added per job)."""
    flags = [
        "--mock-data", "--vocab-size", "512",
        "--num-layers", str(args.train_layers), "--hidden-size", str(args.hidden),
        "--ffn-hidden-size", str(args.ffn_hidden), "--num-attention-heads", "8",
        "--seq-length", str(args.train_seq_length), "--micro-batch-size",
        str(args.tokens // args.train_seq_length),
        "--global-batch-size", str(args.tokens // args.train_seq_length * args.nodes
                                   * args.ranks_per_node),
        "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
        "--num-experts", str(args.experts), "--moe-router-topk", str(topk),
        "--moe-router-load-balancing-type", "none",
        "--expert-model-parallel-size", str(args.nodes * args.ranks_per_node),
        "--train-iters", str(args.train_iters), "--log-interval", "1", "--eval-iters", "0",
        "--eval-interval", str(args.train_iters + 1), "--no-progress-bar",
        "--moe-token-dispatcher-type", dispatcher]
    if dispatcher == "monta":
        flags += args.train_monta_args.split()
    return flags


def run_training(args: argparse.Namespace, loads: list) -> list[dict]:
    samples: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for rep in range(args.train_reps):
        for topk in args.train_topks:
            order = (STOCK, "monta") if rep % 2 == 0 else ("monta", STOCK)  # alternate first
            for dispatcher in order:
                run = train_on_testbed(
                    train_flags(args, topk, dispatcher),
                    name=f"train top{topk} {dispatcher} rep {rep}", inter_gbit=args.train_cap,
                    nodes=args.nodes, ranks_per_node=args.ranks_per_node,
                    timeout_s=args.timeout, policy=_policy(args), loads=loads)
                kept = run.after("iteration-time", args.train_skip)
                if not kept:
                    raise RuntimeError(f"no iteration-time after step {args.train_skip} in "
                                       f"TensorBoard ({sorted(run.scalars)})")
                # forward dispatch + combine of every MoE layer (monta.dispatch.stats), per step
                phases: dict[int, float] = defaultdict(float)
                for tag, series in run.scalars.items():
                    if tag.startswith("moe-time/") and tag.endswith(("/dispatch-ms",
                                                                     "/combine-ms")):
                        for step, value in series.items():
                            phases[step] += value
                samples[(topk, dispatcher)].append({
                    "iteration_s": kept, "median_iteration_s": statistics.median(kept),
                    "inter_bytes_per_step": median_after(
                        run.scalars.get("moe-comm/inter-bytes-per-step", {}), args.train_skip),
                    "intra_bytes_per_step": median_after(
                        run.scalars.get("moe-comm/intra-bytes-per-step", {}), args.train_skip),
                    "fwd_dispatch_combine_ms_per_step": median_after(phases, args.train_skip),
                    "job_seconds": round(run.seconds, 1)})
                print(f"[moe_ab] train top-{topk} {dispatcher} rep {rep + 1}: "
                      f"{statistics.median(kept) * 1e3:.0f} ms/iteration ({run.seconds:.0f} s "
                      f"job)", flush=True)
    rows = []
    for topk in args.train_topks:
        stock = samples[(topk, STOCK)]
        stock_median = statistics.median(s for run in stock for s in run["iteration_s"])
        for dispatcher in (STOCK, "monta"):
            runs = samples[(topk, dispatcher)]
            median = statistics.median(s for run in runs for s in run["iteration_s"])
            rows.append({
                "topk": topk, "dispatcher": dispatcher,
                "monta_args": args.train_monta_args if dispatcher == "monta" else "",
                "iteration_ms_median": median * 1e3,
                "speedup_vs_alltoall": stock_median / median,
                "fwd_dispatch_combine_ms_per_step": statistics.median(
                    r["fwd_dispatch_combine_ms_per_step"] or 0.0 for r in runs),
                "inter_bytes_per_step": runs[0]["inter_bytes_per_step"],
                "intra_bytes_per_step": runs[0]["intra_bytes_per_step"],
                "runs": runs})
    return rows


# --------------------------------------------------------------------------------------------
# Aggregation, tables, JSON
# --------------------------------------------------------------------------------------------
def _is_meta(tag: str) -> bool:
    return tag.endswith("/meta") or "/meta/" in tag


def byte_totals(tags: dict[str, dict[str, int]]) -> dict[str, int]:
    out = {"inter_bytes": 0, "intra_bytes": 0, "inter_meta_bytes": 0, "intra_meta_bytes": 0}
    for tag, links in tags.items():
        meta = "_meta" if _is_meta(tag) else ""
        out[f"inter{meta}_bytes"] += links["inter"]
        out[f"intra{meta}_bytes"] += links["intra"]
    return out


def build_rows(cap: float, job: dict) -> list[dict]:
    """One row per (layout, top-k, candidate) of a cap, with ratios vs the stock dispatcher."""
    groups: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for raw in job["rows"]:
        groups[(raw["layout"]["name"], raw["topk"])][raw["candidate"]["label"]] = raw
    rows = []
    for (layout, topk), cands in groups.items():
        digests = {raw["routing_digest"] for raw in cands.values()}
        nocomm = statistics.median(cands["nocomm"]["times_s"])
        stock = None
        case_rows = []
        for label, raw in cands.items():
            layer = statistics.median(raw["times_s"])
            fwd = [p["fwd_dispatch_s"] + p["fwd_combine_s"] for p in raw["phases"]]
            row = {
                "cap_gbit": cap, "layout": raw["layout"], "topk": topk,
                "candidate": raw["candidate"], "label": label,
                "layer_ms_median": layer * 1e3,
                "layer_ms": [t * 1e3 for t in raw["times_s"]],
                "nocomm_ms_median": nocomm * 1e3,
                "comm_ms": (layer - nocomm) * 1e3 if label != "nocomm" else 0.0,
                "fwd_dispatch_combine_ms": statistics.median(fwd) * 1e3,
                **byte_totals(raw["tags"]),
                "tags": raw["tags"], "routing_digest": raw["routing_digest"],
                "tuned": raw.get("tuned"),
                "same_routing_as_others": len(digests) == 1,
            }
            if label == STOCK:
                stock = row
            case_rows.append(row)
        for row in case_rows:
            if stock is None or row["label"] == "nocomm":
                row.update(speedup_vs_alltoall=None, comm_speedup_vs_alltoall=None,
                           inter_bytes_vs_alltoall=None)
                continue
            row["speedup_vs_alltoall"] = stock["layer_ms_median"] / row["layer_ms_median"]
            # None when either comm time is <= 0: the no-comm reference was as slow (noise, or
            # a candidate hiding all its communication behind compute)
            row["comm_speedup_vs_alltoall"] = (stock["comm_ms"] / row["comm_ms"]
                                               if row["comm_ms"] > 0 and stock["comm_ms"] > 0
                                               else None)
            row["inter_bytes_vs_alltoall"] = (row["inter_bytes"] / stock["inter_bytes"]
                                              if stock["inter_bytes"] else None)
        rows += case_rows
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["label"] != "nocomm":
            groups[(row["cap_gbit"], row["layout"]["name"], row["topk"])].append(row)
    out = []
    for (cap, layout, topk), cands in groups.items():
        if not any(r["speedup_vs_alltoall"] for r in cands):
            continue
        best = max(cands, key=lambda r: r["speedup_vs_alltoall"] or 0)
        montas = [r for r in cands if r["candidate"]["dispatcher"] == "monta"]
        bm = max(montas, key=lambda r: r["speedup_vs_alltoall"] or 0)
        tuned = next((r for r in montas if r["label"] == TUNE["label"]), None)
        by_label = {r["label"]: r for r in cands}
        ds_tp = by_label.get("ds_tp")
        out.append({"cap_gbit": cap, "layout": layout, "topk": topk, "best": best["label"],
                    "best_speedup": best["speedup_vs_alltoall"], "best_monta": bm["label"],
                    "best_monta_speedup": bm["speedup_vs_alltoall"],
                    "best_monta_comm_speedup": bm["comm_speedup_vs_alltoall"],
                    "tune_pick": tuned and tuned.get("tuned"),
                    "tune_speedup": tuned and tuned["speedup_vs_alltoall"],
                    "tune_comm_speedup": tuned and tuned["comm_speedup_vs_alltoall"],
                    "tune_inter_bytes_ratio": tuned and tuned["inter_bytes_vs_alltoall"] and
                    1 / tuned["inter_bytes_vs_alltoall"],
                    "tune_comm_speedup_vs_ds_tp": (
                        ds_tp["comm_ms"] / tuned["comm_ms"]
                        if tuned and ds_tp and tuned["comm_ms"] > 0 and ds_tp["comm_ms"] > 0
                        else None)})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: cap 1 Gbit/s, top-2/8, chunks 1/4, 2 rounds, training "
                             "top-8 once with 3 iterations")
    parser.add_argument("--caps", type=comma_floats, default=[0.4, 1.0, 4.0],
                        help="inter-node caps, Gbit/s per direction (one testbed job each)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--topks", type=comma_ints, default=[1, 2, 4, 8])
    parser.add_argument("--chunks", type=comma_ints, default=[1, 2, 4, 8],
                        help="monta --monta-chunks values (TP2 layout: 1 and the largest)")
    parser.add_argument("--layouts", type=lambda s: s.split(","), default=["tp1ep4", "tp2ep2etp2"],
                        help="comma-separated: tp1ep4, tp2ep2etp2")
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank (SP shard)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn-hidden", type=int, default=64,
                        help="expert FFN size; small so communication dominates on 2 cores")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-train", action="store_true", help="skip the training comparison")
    parser.add_argument("--train-topks", type=comma_ints, default=[4, 8])
    parser.add_argument("--train-cap", type=float, default=1.0, help="Gbit/s")
    parser.add_argument("--train-iters", type=int, default=6)
    parser.add_argument("--train-skip", type=int, default=2,
                        help="iterations dropped from the median (warm-up)")
    parser.add_argument("--train-reps", type=int, default=2,
                        help="runs per (top-k, dispatcher), alternating which goes first")
    parser.add_argument("--train-layers", type=int, default=2)
    parser.add_argument("--train-seq-length", type=int, default=512,
                        help="micro-batch = --tokens / this many sequences")
    parser.add_argument("--train-monta-args", default="--monta-node-dedup auto --monta-chunks 4",
                        help="flags of the monta run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per testbed job, seconds")
    add_load_args(parser)
    add_output_args(parser, DEFAULT_OUT, "layer time per candidate, top-k and cap")
    args = parser.parse_args(argv)
    if args.quick:
        args.caps, args.topks, args.reps = [1.0], [2, 8], 2
        args.chunks = [1, 4]
        args.train_topks, args.train_reps, args.train_iters, args.train_skip = [8], 1, 3, 1
    if args.tokens % args.train_seq_length and not args.no_train:
        parser.error(f"--tokens {args.tokens} must be a multiple of --train-seq-length "
                     f"{args.train_seq_length}")
    if args.train_iters <= args.train_skip and not args.no_train:
        parser.error(f"--train-iters {args.train_iters} must exceed --train-skip "
                     f"{args.train_skip}")
    try:
        layouts(args.layouts, args.chunks)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if testbed_unavailable("moe_ab"):
        return EXIT_UNAVAILABLE
    exit_on_sigterm()
    start = time.perf_counter()
    loads: list[dict] = []
    warn_if_loaded(_policy(args))
    config = worker_config(args)
    rows, veth, job_seconds = [], {}, {}
    for cap in args.caps:
        print(f"[moe_ab] cap {cap:g} Gbit/s: {len(args.layouts)} layout(s) x "
              f"{len(args.topks)} top-k x candidates, {args.reps} rounds", flush=True)
        job = run_layer_job(args, cap, config, loads)
        rows += build_rows(cap, job)
        veth[f"{cap:g}"] = job["veth_bytes"]
        job_seconds[f"layers cap {cap:g}"] = round(job["job_seconds"], 1)
        print(f"[moe_ab] cap {cap:g} Gbit/s done in {job['job_seconds']:.0f} s", flush=True)
    training = [] if args.no_train else run_training(args, loads)
    record = load_record(loads, _policy(args))
    result = {
        **result_header("moe_ab", args, worker_config=config),
        "timing_method": "layer fwd+bwd, max over ranks of end - start after a barrier; comm = "
                         "layer - no-comm reference (EP=TP=1 on single-rank groups, same routing)",
        **record,
        "caps": args.caps, "rows": rows, "summary": summarize(rows), "training": training,
        "veth_bytes": veth,
        "wall_seconds": {"total": round(time.perf_counter() - start, 1), **job_seconds},
    }
    write_result("moe_ab", result, args, markdown, plot,
                 seconds=result["wall_seconds"]["total"],
                 detail=f": 1-min load {record['load_average']['before_first_job']:.2f} before, "
                        f"other processes up to {record['foreign_cpu_cores_max']:.2f} cores")
    bad = [f"{r['cap_gbit']:g} {r['layout']['name']} top{r['topk']}" for r in rows
           if not r["same_routing_as_others"]]
    if bad:
        print(f"[moe_ab] candidates saw different routings in: {sorted(set(bad))}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
