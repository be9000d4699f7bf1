"""Smoke test of ``tools/bench_comm.py`` (and of the rank side it runs,
``monta.testbed.collective_bench``): ``--help`` without a job, and one tiny run on the emulated
testbed (2 nodes × 2 ranks, 1 Gbit/s; ~20-30 s on 2 cores) whose cluster spec must show both
link classes, positive bandwidths, and inter slower than intra. Skips with the testbed's reason
where network namespaces are not allowed. The sweep's extension for series whose time does
not grow is tested with a scripted bench; the α-β fit it reports is tested in
``tests/planner/test_calibration.py``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import monta.testbed as tb
from monta.testbed import run_on_testbed

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_comm.py"


def test_help_and_no_job_without_torch_distributed():
    proc = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0 and "--out" in proc.stdout, proc.stderr
    # parsing the flags imports neither torch nor torch.distributed
    probe = ("import runpy, sys\nsys.argv = ['bench_comm.py', '--help']\ntry:\n"
             f"    runpy.run_path({str(TOOL)!r}, run_name='__main__')\n"
             "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=60, cwd=REPO)
    assert imported.stdout.strip().endswith("False"), imported.stdout + imported.stderr
    no_job = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin"})
    assert no_job.returncode == 2 and "torchrun" in no_job.stderr


def test_cluster_spec_on_testbed(tmp_path):
    available, reason = tb.testbed_available()
    if not available:
        pytest.skip(reason)
    out = tmp_path / "cluster.yaml"
    result = run_on_testbed(
        [sys.executable, str(TOOL), "--out", str(out), "--plot", str(tmp_path / "c.png"),
         "--min-size", "64K", "--max-size", "4M", "--reps", "2", "--contention-size", "1M"],
        nodes=2, ranks_per_node=2, inter_gbit=1.0, timeout_s=80, cwd=REPO)
    assert result.returncode == 0, result.output[-4000:]
    spec = yaml.safe_load(out.read_text())
    assert (spec["nodes"], spec["ranks_per_node"]) == (2, 2)
    links = spec["links"]
    assert set(links) == {"intra", "inter"}
    for link in links.values():
        assert link["bandwidth_GBps"] > 0 and link["latency_us"] >= 0
        assert set(link["ops"]) == {"p2p", "all_to_all", "all_gather", "reduce_scatter"}
    assert links["inter"]["bandwidth_GBps"] < links["intra"]["bandwidth_GBps"], links
    assert spec["contention"]["inter_under_intra"] > 0
    assert spec["contention"]["intra_under_inter"] > 0
    # every group at once: a node's 2 ranks together; inter through the 0.125 GB/s cap (a
    # margin for tbf's 256 kB burst on 1 MB messages)
    assert 0 < links["inter"]["node_bandwidth_GBps"] < 0.16
    assert links["intra"]["node_bandwidth_GBps"] > 0
    assert spec["measured_on"] and spec["date"] and len(spec["load_average"]["before"]) == 3
    raw = json.loads(out.with_suffix(".json").read_text())
    # the fitted bytes are the counters' payload: S for p2p, S·(W−1)/W for the collectives
    for point in raw["points"]:
        world = point["group_size"]
        expected = point["size"] if point["op"] == "p2p" else point["size"] * (world - 1) // world
        assert point["bytes"] == expected, point


class _ScriptedBench:
    """Stands in for ``CollectiveBench`` in the sweep's extension: t = latency + bytes/β for
    the (link, op)s in ``slopes`` (β None: time flat at 1 ms, as noise on a fast link reads)."""

    rank = 0

    def __init__(self, slopes):
        self.slopes, self.calls = slopes, []

    def sweep(self, sizes, active):
        self.calls.append((list(sizes), list(active)))
        points = []
        for size in sizes:
            for link, op in active:
                beta = self.slopes[(link, op)](size)
                points.append({"link": link, "op": op, "size": size, "bytes": size,
                               "median_s": 1e-3 + (size / beta if beta else 0.0)})
        return points


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_comm_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flat_fits_are_measured_at_larger_sizes_then_refused(capsys):
    """The CI failure this guards: noise made the intra all-to-all's time fall with size, and
    the tool wrote a spec with ``bandwidth_GBps: null``. Now such a series is measured further
    up (×factor, within the point budget and --extra-sizes), and what still does not grow is
    reported by ``unfitted`` (the tool then exits 1 without writing)."""
    tool = _load_tool()
    args = tool.parse_args(["--min-size", "64K", "--max-size", "1M", "--factor", "4",
                            "--extra-sizes", "3"])
    intra, inter = ("intra", "all_to_all"), ("inter", "all_to_all")
    # intra shows its slope from 16M on; inter grows from the start
    bench = _ScriptedBench({intra: lambda s: 1e9 if s >= 16 << 20 else None,
                            inter: lambda s: 1e8})
    sizes = tool.size_sweep(args.min_size, args.max_size, args.factor)
    points = bench.sweep(sizes, [intra, inter])
    points, fits = tool._grow_flat_fits(bench, args, points, sizes[-1])
    assert bench.calls[1:] == [([4 << 20], [intra]), ([16 << 20], [intra])]
    assert tool.unfitted(fits) == [] and fits["intra"]["all_to_all"]["bandwidth_Bps"] > 0
    assert "adding 4M" in capsys.readouterr().out
    # flat everywhere: three larger sizes, then still unfitted
    bench = _ScriptedBench({intra: lambda s: None, inter: lambda s: 1e8})
    points, fits = tool._grow_flat_fits(bench, args, bench.sweep(sizes, [intra, inter]),
                                        sizes[-1])
    assert [c[0] for c in bench.calls[1:]] == [[4 << 20], [16 << 20], [64 << 20]]
    assert tool.unfitted(fits) == [intra]
    # a series already past --point-budget-s is not grown
    args.point_budget_s = 1e-4
    bench = _ScriptedBench({intra: lambda s: None, inter: lambda s: 1e8})
    tool._grow_flat_fits(bench, args, bench.sweep(sizes, [intra, inter]), sizes[-1])
    assert len(bench.calls) == 1
