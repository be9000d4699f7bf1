"""``bench/multigpu.sh``: the multi-GPU run is one command. Here (no GPU) its dry run prints the
resolved steps, and its rank body runs the NCCL correctness part on gloo CPU ranks (slow test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "multigpu.sh"


def test_script_parses_and_dry_run_prints_every_step(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "4", "--ranks-per-node", "2", "--quick",
                           "--dry-run", "--out-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={"PATH": f"{Path(sys.executable).parent}:"
                                                              "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(steps) == 5, proc.stdout  # worker, bench_comm, 2 trainings, report
    assert "bench/multigpu_worker.py --ranks-per-node 2" in steps[0]
    assert "--parts correctness,dispatch" in steps[0]
    assert "tools/bench_comm.py --ranks-per-node 2" in steps[1]
    assert "--moe-token-dispatcher-type alltoall" in steps[2]
    assert "--moe-token-dispatcher-type monta" in steps[3] and "--expert-model-parallel-size 4" \
        in steps[3]
    assert "multigpu_cpu-gloo-x4.json" in steps[4]
    assert not list(tmp_path.glob("*.json")), "a dry run must not run anything"


def test_script_refuses_bad_node_split(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "3", "--ranks-per-node", "2",
                           "--dry-run", "--out-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "do not split into nodes of 2" in proc.stderr


@pytest.mark.slow
def test_worker_correctness_on_cpu_ranks(tmp_path):
    out = tmp_path / "worker.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29577", str(REPO / "bench" / "multigpu_worker.py"),
         "--ranks-per-node", "1", "--parts", "correctness", "--dtypes", "fp32",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    layouts = {row["layout"] for row in result["correctness"]}
    assert layouts == {"tp2-ep2-etp1-dp1-sp", "tp1-ep2-etp1-dp2", "tp2-ep1-etp2-dp1-sp"}
    assert {row["dispatcher"] for row in result["correctness"]} == {
        "alltoall", "ds_tp", "monta/flat/c1", "monta/dedup/c1", "monta/flat/c4",
        "monta/dedup/c4"}
    assert result["correctness_summary"] == {"cases": len(result["correctness"]), "failed": 0}
    assert all(row["tensors_compared"] > 3 for row in result["correctness"])
