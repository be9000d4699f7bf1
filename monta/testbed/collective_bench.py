"""The rank side of ``tools/bench_comm.py``: groups per link class, a cross-rank timer, the
collectives, the size sweep and the contention test, run by every rank of the job.

Why a module of its own: ``tools/bench_comm.py`` is the command line (flags, the result's
metadata, the files it writes); this is what each rank measures, which reads apart from that and
is importable by name. It lives beside :mod:`monta.testbed.probe_worker` (the testbed's own link
checks) and :mod:`monta.testbed.hostload`, but nothing in it needs the testbed: under torchrun it
measures a real cluster the same way. torch is imported when a :class:`CollectiveBench` is made,
not at import, so ``tools/bench_comm.py --help`` runs without it. The method (groups, pairs, what
the sweep and the contention test run) is in ``tools/bench_comm.py``'s docstring.

Timing: a barrier, then each member times its part. On one host (the testbed) the op's time is
max(end) − min(start) over its members (``time.perf_counter`` is one clock for every process of a
host, and a receiver's own duration would miss data sent before it left the barrier); across
hosts, whose clocks are unrelated, it is the longest member's own duration. ``--inner`` ops run
back to back per sample. Medians over ``--reps`` after ``--warmup``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import statistics
import threading
import time
from typing import Any, Callable

from monta.planner.calibration import (
    GB, LINKS, OPS, format_size, payload_bytes, quartiles, round_size,
)


class CollectiveBench:
    """One rank's part of the measurement; every rank of the job makes one with the same
    ``args`` (``tools/bench_comm.py``'s flags). Making it joins the process group."""

    def __init__(self, args: argparse.Namespace):
        import torch
        import torch.distributed as dist

        from monta import comm
        from monta.topology import detect_topology

        self.torch, self.dist, self.comm = torch, dist, comm
        self.args = args
        backend = args.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.pg_timeout_s))
        self.backend = backend
        self.inner = args.inner or (1 if backend == "gloo" else 20)
        self._streams: dict[int, Any] = {}
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # timing and barriers on host tensors: a gloo group even when the data go over NCCL
        self.ctrl = dist.new_group(backend="gloo") if backend != "gloo" else None
        self.topology = detect_topology(args.ranks_per_node, group=self.ctrl)
        hosts: list[Any] = [None] * self.world
        dist.all_gather_object(hosts, socket.gethostname(), group=self.ctrl)
        self.one_host = len(set(hosts)) == 1  # one clock for every rank
        self.nodes = self.topology.num_nodes
        self.per_node = self.topology.ranks_per_node
        self._make_groups()

    # -- groups --------------------------------------------------------------------------
    def _make_groups(self) -> None:
        """Every rank creates every group, in the same order (torch.distributed requires it)."""
        dist, topo = self.dist, self.topology
        node_ranks = [list(topo.ranks_on_node(n)) for n in range(self.nodes)]
        intra = node_ranks if self.per_node >= 2 else []
        inter = ([[node_ranks[n][i] for n in range(self.nodes)] for i in range(self.per_node)]
                 if self.nodes >= 2 else [])
        self.groups: dict[str, list[tuple[list[int], Any]]] = {"intra": [], "inter": []}
        for link, rank_lists in (("intra", intra), ("inter", inter)):
            for ranks in rank_lists:
                self.groups[link].append((ranks, dist.new_group(ranks)))
        self.pairs: dict[str, tuple[list[int], Any]] = {}
        if intra:
            pair = node_ranks[0][:2]
            self.pairs["intra"] = (pair, dist.new_group(pair))
        if inter:
            pair = [node_ranks[0][0], node_ranks[1][0]]
            self.pairs["inter"] = (pair, dist.new_group(pair))
        self.links = [link for link in LINKS if self.groups[link]]

    def my_group(self, link: str) -> tuple[list[int], Any]:
        for ranks, group in self.groups[link]:
            if self.rank in ranks:
                return ranks, group
        raise AssertionError(f"rank {self.rank} is in no {link} group")

    # -- timing --------------------------------------------------------------------------
    def timed(self, parts: dict[str, tuple[list[int], Callable[[], None]]]) -> dict[str, float]:
        """Run each part's callable on its members, concurrently (one thread per part), after a
        barrier of the whole world; return each part's span max(end) − min(start) divided by
        ``inner``, the number of back-to-back calls per sample (it amortises the barrier's skew
        and the launch overhead on GPUs)."""
        torch, dist = self.torch, self.dist
        inner = self.inner
        names = list(parts)
        span = torch.full((3 * len(names),), -math.inf, dtype=torch.float64)
        mine = [(i, fn) for i, (members, fn) in enumerate(parts.values()) if self.rank in members]

        def run(i: int, fn: Callable[[], None]) -> None:
            stream = self._stream(i)
            start = time.perf_counter()
            if stream is not None:
                with torch.cuda.stream(stream):
                    for _ in range(inner):
                        fn()
                stream.synchronize()
            else:
                for _ in range(inner):
                    fn()
            end = time.perf_counter()
            span[3 * i], span[3 * i + 1], span[3 * i + 2] = -start, end, end - start

        dist.barrier(group=self.ctrl)
        if len(mine) == 1:
            run(*mine[0])
        elif mine:
            threads = [threading.Thread(target=run, args=item) for item in mine[1:]]
            for t in threads:
                t.start()
            run(*mine[0])
            for t in threads:
                t.join()
        dist.all_reduce(span, op=dist.ReduceOp.MAX, group=self.ctrl)
        if self.one_host:  # max(end) - min(start)
            return {name: (span[3 * i] + span[3 * i + 1]).item() / inner
                    for i, name in enumerate(names)}
        return {name: span[3 * i + 2].item() / inner for i, name in enumerate(names)}

    def _stream(self, i: int):
        """The i-th part's CUDA stream (made once); None on CPU."""
        if self.device.type != "cuda":
            return None
        if i not in self._streams:
            self._streams[i] = self.torch.cuda.Stream()
        return self._streams[i]

    # -- ops -----------------------------------------------------------------------------
    def op_fn(self, op: str, size: int, ranks: list[int], group: Any,
              counter: Any) -> Callable[[], None]:
        """A callable running one ``op`` of per-rank buffer ``size`` bytes over ``group``."""
        torch, dist, comm = self.torch, self.dist, self.comm
        world = len(ranks)
        numel = size // 4
        buf = torch.ones(numel, dtype=torch.float32, device=self.device)
        kw = dict(group=group, topology=self.topology, tag=f"bench/{op}", counter=counter)
        if op == "p2p":
            src, dst = ranks[0], ranks[1]

            rows = [numel if r == dst else 0 for r in dist.get_process_group_ranks(group)]

            def p2p() -> None:
                if self.rank == src:
                    comm.count_sends(rows, 4, **kw)
                    dist.send(buf, dst, group=group)
                else:
                    dist.recv(buf, src, group=group)
            return p2p
        if op == "all_to_all":
            splits = [numel // world] * world
            return lambda: comm.all_to_all_v_async(buf, splits, splits, **kw)[1].wait()
        if op == "all_gather":
            part = buf[: numel // world]
            sizes = [numel // world] * world
            return lambda: comm.all_gather_v_async(part, sizes, **kw)[1].wait()
        if op == "reduce_scatter":
            sizes = [numel // world] * world
            return lambda: comm.reduce_scatter_v(buf, sizes, **kw)
        raise ValueError(f"unknown op {op!r}; choose from {OPS}")

    def case(self, link: str, op: str) -> tuple[list[int], Any]:
        """The ranks and group an ``op`` runs on for ``link``: the pair for p2p, else the first
        group of that link class."""
        if op == "p2p":
            return self.pairs[link]
        return self.groups[link][0]

    # -- 1) the sweep --------------------------------------------------------------------
    def cases(self) -> list[tuple[str, str]]:
        """Every (link, op) the sweep measures."""
        return [(link, op) for link in self.links for op in self.args.ops]

    def sweep(self, raw_sizes: list[int], active: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Time every (link, op) of ``active`` at each size (ascending), dropping one once its
        median exceeds ``--point-budget-s``; returns one point per (link, op, size)."""
        args = self.args
        points = []
        for raw_size in raw_sizes:
            if not active:
                break
            fns, sizes, counters = {}, {}, {}
            for link, op in active:
                ranks, group = self.case(link, op)
                size = round_size(raw_size, len(ranks))
                sizes[(link, op)] = size
                counters[(link, op)] = self.comm.LinkBytes()
                fns[(link, op)] = (ranks, self.op_fn(op, size, ranks, group, counters[(link, op)])
                                   if self.rank in ranks else None)
            times: dict[tuple[str, str], list[float]] = {key: [] for key in active}
            for rep in range(args.warmup + args.reps):
                for key in active:  # interleaved: every (link, op) once per repetition
                    ranks, fn = fns[key]
                    t = self.timed({"x": (ranks, fn or (lambda: None))})["x"]
                    if rep >= args.warmup:
                        times[key].append(t)
            # bytes per op: the sender's counter over all repetitions (MAX over ranks)
            sent = self.torch.tensor([counters[key].by_link()[key[0]] for key in active],
                                     dtype=self.torch.float64) / (
                (args.warmup + args.reps) * self.inner)
            self.dist.all_reduce(sent, op=self.dist.ReduceOp.MAX, group=self.ctrl)
            still = []
            for key, nbytes in zip(active, sent.tolist()):
                link, op = key
                size, median = sizes[key], statistics.median(times[key])
                nbytes = int(round(nbytes))
                expect = payload_bytes(op, size, len(self.case(link, op)[0]))
                if nbytes != expect:
                    raise AssertionError(f"{link} {op} {size} B: counters say {nbytes} bytes "
                                         f"sent, expected {expect}")
                points.append({"link": link, "op": op, "size": size,
                               "group_size": len(self.case(link, op)[0]), "bytes": nbytes,
                               "median_s": median, "min_s": min(times[key]), "times_s": times[key],
                               "busbw_GBps": nbytes / median / GB,
                               "algbw_GBps": size / median / GB})
                if median <= args.point_budget_s:
                    still.append(key)
                elif self.rank == 0:
                    print(f"[bench_comm] {link} {op}: {median:.2f} s at {format_size(size)} "
                          f"> --point-budget-s {args.point_budget_s:g}; no larger sizes",
                          flush=True)
            active = still
            if self.rank == 0:
                print(f"[bench_comm] {format_size(raw_size)} done", flush=True)
        return points

    # -- 3) contention -------------------------------------------------------------------
    def contention(self, fits: dict[str, dict[str, dict]]) -> dict[str, Any] | None:
        if "inter" not in self.links or "intra" not in self.links:
            return None
        args = self.args
        inter_ranks, inter_group = self.my_group("inter")
        intra_ranks, intra_group = self.my_group("intra")
        everyone = list(range(self.world))
        counter = self.comm.LinkBytes()
        inter_size = round_size(args.contention_size, len(inter_ranks))
        a2a = self.op_fn("all_to_all", inter_size, inter_ranks, inter_group, counter)
        # every inter group at once: the nodes' links are shared as in a real dispatch
        inter_alone = [self.timed({"a2a": (everyone, a2a)})["a2a"]
                       for _ in range(args.warmup + args.reps)]
        t_inter = statistics.median(inter_alone[args.warmup:])
        fit = fits["intra"].get("all_gather") or next(iter(fits["intra"].values()))
        w = len(intra_ranks)
        if fit["bandwidth_Bps"]:
            payload = max(0.0, t_inter - (fit["latency_s"] or 0.0)) * fit["bandwidth_Bps"]
            intra_size = int(payload * w / (w - 1))
        else:
            intra_size = inter_size
        intra_size = round_size(min(max(intra_size, args.min_size), args.contention_max_size), w)
        ag = self.op_fn("all_gather", intra_size, intra_ranks, intra_group, counter)
        samples: dict[str, list[float]] = {k: [] for k in
                                           ("inter_alone", "intra_alone", "inter_tog", "intra_tog")}
        for rep in range(args.warmup + args.contention_reps):  # interleaved: alone, alone, both
            a = self.timed({"a2a": (everyone, a2a)})["a2a"]
            b = self.timed({"ag": (everyone, ag)})["ag"]
            both = self.timed({"a2a": (everyone, a2a), "ag": (everyone, ag)})
            if rep >= args.warmup:
                samples["inter_alone"].append(a)
                samples["intra_alone"].append(b)
                samples["inter_tog"].append(both["a2a"])
                samples["intra_tog"].append(both["ag"])
        med = {k: statistics.median(v) for k, v in samples.items()}
        # spread of the per-round ratios (each round's together / that round's alone)
        ratios = {k: sorted(t / a for t, a in zip(samples[f"{k}_tog"], samples[f"{k}_alone"]))
                  for k in ("inter", "intra")}
        return {
            "inter_op": "all_to_all", "inter_size": inter_size, "inter_group_size":
                len(inter_ranks), "intra_op": "all_gather", "intra_size": intra_size,
            "intra_group_size": w, "all_groups_at_once": True,
            "inter_alone_s": med["inter_alone"], "intra_alone_s": med["intra_alone"],
            "inter_together_s": med["inter_tog"], "intra_together_s": med["intra_tog"],
            "inter_under_intra": round(med["inter_tog"] / med["inter_alone"], 3),
            "intra_under_inter": round(med["intra_tog"] / med["intra_alone"], 3),
            "ratio_quartiles": {k: [round(q, 3) for q in quartiles(v)]
                                for k, v in ratios.items()},
            "samples_s": samples,
        }

    def close(self) -> None:
        self.dist.destroy_process_group()
