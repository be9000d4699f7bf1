"""Rank programs that check the testbed's links: run under ``python -m monta.testbed``.

    python -m monta.testbed --nodes 2 --ranks-per-node 2 --inter-gbit 1 -- \\
        python -m monta.testbed.probe_worker throughput --mb 16 --reps 5 --out /tmp/tp.json
    python -m monta.testbed --nodes 2 --ranks-per-node 2 --inter-gbit 1 --link-stats /tmp/l.json \\
        -- python -m monta.testbed.probe_worker bytes --row-kb 4 --unit-rows 170 --out /tmp/b

``throughput``: rank 0 sends ``--mb`` MB to rank 1 (same node), then to rank G (node 1),
``--reps`` times each after a warm-up, while the other ranks wait. Rank 0 writes
``{"intra_mb_s", "inter_mb_s", "intra_best_mb_s", ...}``: MB/s, median (and best) over the reps.
One direction on purpose: gloo sending both ways at once over a capped link either overlaps the
two directions or runs them one after the other (0.13 s or 0.26 s for 16 MB at 1 Gbit/s, at
random), which makes the inter-node median bimodal.

``bytes``: one :func:`monta.comm.all_to_all_v` with the uneven pattern
``rows[src][dst] = (1 + src + 2 * dst) * unit_rows`` inside :func:`monta.comm.count_bytes`; the
received rows are checked; every rank writes ``{"rank", "intra", "inter"}`` (its counter, bytes)
to ``OUT/rank<R>.json``. ``--unit-rows 0`` runs the same job with nothing to send (the baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

_MB = 1e6
_PG_TIMEOUT = timedelta(seconds=120)


def _throughput(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    g = int(os.environ["LOCAL_WORLD_SIZE"])
    if g < 2 or world < 2 * g:
        raise SystemExit(f"throughput needs >= 2 nodes of >= 2 ranks, got WORLD_SIZE={world} "
                         f"LOCAL_WORLD_SIZE={g}")
    numel = int(args.mb * _MB) // 4
    send, recv = torch.ones(numel), torch.empty(numel)
    result: dict[str, object] = {"mb": args.mb, "reps": args.reps, "world_size": world}
    # Rank 0 with its intra-node neighbour, then with the rank of the same local rank on node 1;
    # the other ranks only join the barriers, so one pair has the CPUs and the link to itself.
    for phase, pair in {"intra": (0, 1), "inter": (0, g)}.items():
        times = []
        for rep in range(args.reps + 1):  # rep 0 warms up (connections, allocation)
            # [-start, end] of this rank's part; time.perf_counter is CLOCK_MONOTONIC, one
            # clock for every process on the host, so the pair's span is max(end) - min(start).
            # Timing the receiver alone would miss data sent before it left the barrier.
            span = torch.full((2,), -math.inf, dtype=torch.float64)
            dist.barrier()
            if rank in pair:
                span[0] = -time.perf_counter()
                if rank == pair[0]:
                    dist.send(send, pair[1])
                else:
                    dist.recv(recv, pair[0])
                span[1] = time.perf_counter()
            dist.all_reduce(span, op=dist.ReduceOp.MAX)
            if rep:
                times.append((span[1] + span[0]).item())
        if rank == 0:
            result[f"{phase}_mb_s"] = numel * 4 / _MB / statistics.median(times)
            result[f"{phase}_best_mb_s"] = numel * 4 / _MB / min(times)
            result[f"{phase}_times_s"] = times
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def _bytes(args: argparse.Namespace) -> None:
    from monta import comm
    from monta.topology import detect_topology

    rank, world = dist.get_rank(), dist.get_world_size()
    topology = detect_topology()
    row = int(args.row_kb * 1024) // 4  # fp32 elements per row
    rows = [[(1 + s + 2 * d) * args.unit_rows for d in range(world)] for s in range(world)]
    # Row values encode the sender, so the receiver can check where each block came from.
    x = torch.full((sum(rows[rank]), row), float(rank))
    counter = comm.LinkBytes()
    with comm.count_bytes(counter):
        out = comm.all_to_all_v(x, rows[rank], [rows[s][rank] for s in range(world)],
                                group=None, topology=topology, tag="probe")
    expected = torch.cat([torch.full((rows[s][rank], row), float(s)) for s in range(world)])
    if not torch.equal(out, expected):
        raise SystemExit(f"rank {rank}: all_to_all_v delivered the wrong rows")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "node": topology.node(rank), **counter.by_link()}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    tp = sub.add_parser("throughput", help="intra- vs inter-node point-to-point MB/s")
    tp.add_argument("--mb", type=float, default=16.0, help="MB per message (default 16)")
    tp.add_argument("--reps", type=int, default=3, help="timed repetitions (default 3)")
    tp.add_argument("--out", required=True, help="JSON file written by rank 0")
    nb = sub.add_parser("bytes", help="comm-layer byte counters of one uneven all_to_all_v")
    nb.add_argument("--row-kb", type=float, default=4.0, help="KiB per row (default 4)")
    nb.add_argument("--unit-rows", type=int, default=170,
                    help="rows per pattern unit (default 170: ~31 MB inter-node on 2 x 2)")
    nb.add_argument("--out", required=True, help="directory for rank<R>.json")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=_PG_TIMEOUT)
    try:
        {"throughput": _throughput, "bytes": _bytes}[args.mode](args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
