"""Measure collectives per link class (intra-node, inter-node) and write a cluster-spec YAML.

    # the emulated 2-node testbed (repo root, venv active), ~1 min at 1 Gbit/s
    python -m monta.testbed --nodes 2 --ranks-per-node 2 --inter-gbit 1 -- \\
        python tools/bench_comm.py --out bench/results/cluster_testbed_1gbit.yaml \\
            --plot bench/results/cluster_testbed_1gbit.png
    # a real cluster (every node runs the same line)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 tools/bench_comm.py \\
        --out cluster.yaml
    python tools/bench_comm.py --help                     # needs no torch.distributed

What runs. The node of every rank comes from :func:`monta.topology.detect_topology` (torchrun's
environment; ``--ranks-per-node`` overrides). From it the tool builds, on every rank, the
*intra* groups (the ranks of one node) and the *inter* groups (the ranks with the same local
index on every node), and the pairs ``(node0[0], node0[1])`` (intra) and
``(node0[0], node1[0])`` (inter). Then:

  1) a sweep of message sizes (``--min-size`` … ``--max-size``, ×``--factor``) of
     point-to-point send/recv (one direction), all-to-all, all-gather and reduce-scatter
     (:mod:`monta.comm`'s ``all_to_all_v`` / ``all_gather_v`` / ``reduce_scatter_v``) on the
     first group (or pair) of each link class *alone*: the other ranks wait in a barrier. Every
     repetition visits every (link, op) once, so link classes and ops are interleaved; an
     (link, op) whose median exceeds ``--point-budget-s`` is not tried at larger sizes, which
     bounds the run time on slow links;
  2) an α-β fit per (link, op): ordinary least squares on ``t = α + bytes / β`` over the
     medians (see :func:`fit_alpha_beta` for why unweighted). ``bytes`` is the payload one rank
     sends off-rank in one op, read from :mod:`monta.comm`'s ``LinkBytes`` counters: S for
     point-to-point, S·(W−1)/W for the collectives (S = the per-rank buffer: the all-to-all
     input, the all-gather output, the reduce-scatter input; W = group size; nccl-tests calls
     bytes/t the *bus bandwidth*). Where time does not grow with size (a fast link whose
     points drown in the shared CPUs' noise) the sweep goes on at up to ``--extra-sizes``
     larger sizes for that (link, op) alone; if it still does not, the tool exits 1 and
     writes nothing, since a spec without a bandwidth would only fail later, in the planner;
  3) contention: every rank runs an all-to-all over its inter group and an all-gather over its
     node, first each alone, then both at once (one thread each); the all-gather's size is
     chosen from the fit so that both take about as long alone. ``inter_under_intra`` =
     t(all-to-all with the all-gather running) / t(all-to-all alone), ``intra_under_inter`` the
     other way round (1.0 = no interference); medians over ``--contention-reps`` interleaved
     rounds, with the quartiles of the per-round ratios beside them (on 2 shared cores the
     factors vary from round to round). This is the overlap MoNTA's chunk pipeline relies
     on (inter-node all-to-all of chunk i+1 under the intra-node all-gather of chunk i).
     The *alone* runs (every group of the class at once, as in SPMD training) also give each
     class's ``node_bandwidth_GBps``: what a node's ranks send together (``node_bandwidth`` in
     :mod:`monta.planner.calibration`; below the per-rank fits × ranks where ranks share NICs,
     or on the one-host testbed CPUs).

Each rank's part (the groups, the timer, the sweep and the contention test, and how an op is
timed across ranks) is :mod:`monta.testbed.collective_bench`; the fits, the spec, the table and
the plot are :mod:`monta.planner.calibration`; this file is the command line and the output.

Output (rank 0): the cluster spec (``--out``, YAML: nodes, ranks_per_node,
links.{intra,inter}.{bandwidth_GBps, latency_us} from the all-to-all fit with the other ops'
fits beside them, node_bandwidth_GBps, contention, measured_on, date), every measured point as
JSON next to it (``.json``), a table on stdout and, with ``--plot``, bus bandwidth against
message size per link class. GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from monta.testbed.hostload import (  # noqa: E402 (after the sys.path fix)
    cpu_busy_seconds, load_averages, own_cpu_seconds,
)
from monta.testbed.collective_bench import CollectiveBench  # noqa: E402
from monta.provenance import source_commit  # noqa: E402
from monta.planner.calibration import (  # noqa: E402
    OPS,
    parse_size,
    size_sweep,
    fit_points,
    format_size,
    unfitted,
    cluster_spec,
    table,
    plot,
)


def run(args: argparse.Namespace) -> int:
    before = load_averages()
    started = time.perf_counter()
    bench = CollectiveBench(args)
    try:
        if not bench.links:
            if bench.rank == 0:
                print(f"[bench_comm] {bench.topology}: no rank pair shares a node and no two "
                      f"nodes exist; nothing to measure", file=sys.stderr)
            return 2
        if bench.rank == 0:
            print(f"[bench_comm] {bench.topology}; backend {bench.backend}; links "
                  f"{', '.join(bench.links)}; ops {', '.join(args.ops)}; 1-min load "
                  f"{before[0]:.2f}", flush=True)
        # foreign load: host CPU time not spent by the ranks, over the measurement
        bench.dist.barrier(group=bench.ctrl)
        busy0, own0 = cpu_busy_seconds(), own_cpu_seconds(children=False)
        wall0 = time.perf_counter()
        sizes = size_sweep(args.min_size, args.max_size, args.factor)
        points, fits = _grow_flat_fits(bench, args, bench.sweep(sizes, bench.cases()),
                                       sizes[-1])
        flat = unfitted(fits)
        if flat:  # every rank fits the same all-reduced times, so every rank stops here
            if bench.rank == 0:
                print(f"[bench_comm] error: time did not grow with message size for "
                      f"{', '.join(f'{link} {op}' for link, op in flat)}, even after "
                      f"{args.extra_sizes} larger size(s): no bandwidth can be fitted, so no "
                      f"spec was written. Rerun with a larger --max-size or more --reps, on "
                      f"idle CPUs (1-min load {before[0]:.2f} before).", file=sys.stderr,
                      flush=True)
            return 1
        contention = None if args.no_contention else bench.contention(fits)
        ranks_cpu = bench.torch.tensor([own_cpu_seconds(children=False) - own0],
                                       dtype=bench.torch.float64)
        bench.dist.all_reduce(ranks_cpu, group=bench.ctrl)
        busy1, wall1 = cpu_busy_seconds(), time.perf_counter()
        if bench.rank != 0:
            return 0
        after = load_averages()
        # mean number of cores other processes kept busy (ranks of this job excluded; one host)
        foreign = (busy1 - busy0 - ranks_cpu.item()) / (wall1 - wall0)
        foreign = round(max(0.0, foreign), 3) if bench.one_host else None
        # the load average after includes this job's own ranks: judge by the one before
        clean = before[0] <= args.max_load and (foreign is None
                                                 or foreign <= args.max_foreign_cores)
        measured_on = args.measured_on or _describe_machine(bench)
        result = {
            "benchmark": "bench_comm",
            "nodes": bench.nodes, "ranks_per_node": bench.per_node, "world_size": bench.world,
            "backend": bench.backend, "device": str(bench.device), "inner": bench.inner,
            "measured_on": measured_on,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": source_commit(),
            "load_average": {"before": before, "after": after},
            "foreign_cpu_cores": foreign, "clean": clean,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
            "groups": {link: {"size": len(bench.case(link, "all_to_all")[0]),
                              "ranks": bench.case(link, "all_to_all")[0],
                              "pair": bench.pairs[link][0]} for link in bench.links},
            "points": points, "fits": fits, "contention": contention,
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        spec = cluster_spec(result)
        print(table(result), flush=True)
        _write(args, result, spec)
        if not clean:
            print(f"[bench_comm] warning: NOT CLEAN: 1-min load average {before[0]:.2f} before "
                  f"(limit {args.max_load:g}), other processes used {foreign} cores on average "
                  f"(limit {args.max_foreign_cores:g}): the CPUs were shared", flush=True)
        return 0
    finally:
        bench.close()


def _grow_flat_fits(bench: CollectiveBench, args: argparse.Namespace,
                    points: list[dict[str, Any]], size: int,
                    ) -> tuple[list[dict[str, Any]], dict]:
    """Measure the (link, op)s whose time did not grow over the sweep (noise on a fast link
    can hide the slope) at up to ``--extra-sizes`` further sizes, ×``--factor`` each after the
    sweep's last ``size``, while they stay within ``--point-budget-s``; returns the points and
    their fits."""
    fits = fit_points(points)
    for _ in range(args.extra_sizes):
        last = {(p["link"], p["op"]): p["median_s"] for p in sorted(points,
                                                                   key=lambda p: p["size"])}
        flat = [key for key in unfitted(fits) if last[key] <= args.point_budget_s]
        if not flat:
            break
        size = int(size * args.factor)
        if bench.rank == 0:
            print(f"[bench_comm] time does not grow with size yet for "
                  f"{', '.join(f'{link} {op}' for link, op in flat)}: adding "
                  f"{format_size(size)}", flush=True)
        points = points + bench.sweep([size], flat)
        fits = fit_points(points)
    return points, fits


def _describe_machine(bench: CollectiveBench) -> str:
    env = os.environ
    what = ""
    if env.get("TORCHELASTIC_RUN_ID") == "monta-testbed":
        cap = _tbf_rate(env.get("GLOO_SOCKET_IFNAME", ""))
        what = (f"emulated testbed (monta.testbed, network namespaces, veth capped by tbf at "
                f"{cap or 'an unknown rate'}), ")
    if bench.device.type == "cuda":
        import torch

        device = torch.cuda.get_device_name()
    else:
        device = f"{os.cpu_count()} CPUs"
    return (f"{what}{socket.gethostname()}, {platform.platform()}, {device}, "
            f"{bench.backend}, torch {bench.torch.__version__}")


def _tbf_rate(dev: str) -> str | None:
    """The tbf rate on ``dev`` in this network namespace (``tc qdisc show``), e.g. "1Gbit"."""
    if not dev:
        return None
    try:
        shown = subprocess.run(["tc", "qdisc", "show", "dev", dev], capture_output=True,
                               text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if "tbf" in shown and "rate" in shown:
        return shown[shown.index("rate") + 1]
    return None


def _write(args: argparse.Namespace, result: dict[str, Any], spec: dict[str, Any]) -> None:
    import yaml

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(spec, sort_keys=False, default_flow_style=False))
    out.with_suffix(".json").write_text(json.dumps(result | {"cluster_spec": spec}, indent=1)
                                        + "\n")
    print(f"[bench_comm] wrote {out} and {out.with_suffix('.json')} "
          f"({result['wall_seconds']} s)", flush=True)
    if args.plot:
        print(f"[bench_comm] {plot(result, Path(args.plot))}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/bench_comm.py",
        description="Latency and bandwidth of p2p, all-to-all, all-gather and reduce-scatter per "
                    "link class (intra-/inter-node), their contention, and a cluster-spec YAML. "
                    "Run every rank under torchrun or python -m monta.testbed.",
        epilog="Example: python -m monta.testbed --nodes 2 --ranks-per-node 2 --inter-gbit 1 -- "
               "python tools/bench_comm.py --out bench/results/cluster_testbed_1gbit.yaml",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="cluster.yaml",
                        help="cluster-spec YAML; every point goes to the same name with .json")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="bandwidth vs message size per link class (needs matplotlib)")
    parser.add_argument("--min-size", type=parse_size, default=parse_size("64K"),
                        help="smallest per-rank buffer (bytes; K/M/G suffixes)")
    parser.add_argument("--max-size", type=parse_size, default=parse_size("16M"),
                        help="largest per-rank buffer")
    parser.add_argument("--factor", type=float, default=4.0, help="size step (geometric)")
    parser.add_argument("--ops", type=lambda s: [op.strip() for op in s.split(",") if op.strip()],
                        default=list(OPS), help="comma-separated subset of " + ",".join(OPS))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per point")
    parser.add_argument("--extra-sizes", type=int, default=3,
                        help="larger sizes (x--factor each) tried for an (link, op) whose time "
                             "did not grow over the sweep, before giving up without a spec")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--inner", type=int, default=0,
                        help="back-to-back ops per timed sample (0: 1 on gloo, 20 on nccl)")
    parser.add_argument("--point-budget-s", type=float, default=1.0,
                        help="stop growing an (link, op) once its median exceeds this")
    parser.add_argument("--contention-size", type=parse_size, default=parse_size("4M"),
                        help="per-rank all-to-all buffer of the contention test")
    parser.add_argument("--contention-max-size", type=parse_size, default=parse_size("256M"),
                        help="cap on the all-gather buffer chosen to match the all-to-all time")
    parser.add_argument("--contention-reps", type=int, default=11,
                        help="timed rounds of the contention test (each: alone, alone, both)")
    parser.add_argument("--no-contention", action="store_true", help="skip the contention test")
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="override the detected topology (emulation on one host)")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="auto: nccl with CUDA, else gloo")
    parser.add_argument("--measured-on", default=None,
                        help="free text for the spec's measured_on (default: host, platform, "
                             "devices, backend)")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="not clean when the 1-min load average before the run exceeds this")
    parser.add_argument("--max-foreign-cores", type=float, default=0.25,
                        help="not clean when other processes kept more cores than this busy "
                             "during the run, on average (one-host jobs only)")
    parser.add_argument("--pg-timeout-s", type=float, default=600.0,
                        help="torch.distributed timeout")
    args = parser.parse_args(argv)
    bad = [op for op in args.ops if op not in OPS]
    if bad or not args.ops:
        parser.error(f"--ops must be a non-empty subset of {','.join(OPS)}, got {args.ops}")
    if args.reps < 1 or args.contention_reps < 1 or args.warmup < 0 or args.extra_sizes < 0:
        parser.error(f"--reps and --contention-reps must be >= 1, --warmup and --extra-sizes "
                     f">= 0, got --reps {args.reps} --contention-reps {args.contention_reps} "
                     f"--warmup {args.warmup} --extra-sizes {args.extra_sizes}")
    try:
        size_sweep(args.min_size, args.max_size, args.factor)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("tools/bench_comm.py runs as the ranks of a job: launch it with torchrun or "
              "python -m monta.testbed (see --help)", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
