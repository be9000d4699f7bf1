"""Smoke test of ``tools/bench_comm.py`` (and of the rank side it runs,
``monta.testbed.collective_bench``): ``--help`` without a job, and one tiny run on the emulated
testbed (2 nodes × 2 ranks, 1 Gbit/s; ~20-30 s on 2 cores) whose cluster spec must show both
link classes, positive bandwidths, and inter slower than intra. Skips with the testbed's reason
where network namespaces are not allowed. The α-β fit it reports is tested in
``tests/planner/test_calibration.py``.
"""

from __future__ import annotations

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
