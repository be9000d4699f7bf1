"""Smoke test of ``bench/dispatch_bytes.py --quick`` (world 4 as 2 nodes × 2, ~15 s).

Runs the script as a user would, then checks the JSON it wrote: every config has a row per
dispatcher, and the inter-node byte totals order as DESIGN §2 says they must.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DISPATCHERS = {"ds_tp", "alltoall", "monta/flat", "monta/dedup"}


def test_quick_benchmark_writes_consistent_results(tmp_path):
    out = tmp_path / "dispatch_bytes.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dispatch_bytes.py"), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists() and out.with_suffix(".md").exists()
    result = json.loads(out.read_text())
    assert result["git_commit"] and result["machine"]["cpu_count"]

    by_config: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in result["rows"]:
        by_config[row["config"]["name"]][row["dispatcher"]] = row
    assert len(by_config) == 8  # TP1·EP4 and TP2·EP2·ETP2, top-1/2/4/8
    for name, rows in by_config.items():
        assert set(rows) == DISPATCHERS, name
        inter = {label: row["inter_bytes"] for label, row in rows.items()}
        tp = rows["ds_tp"]["config"]["tp"]
        assert inter["monta/flat"] > 0, name
        # every TP rank of ds_tp sends what monta sends from one TP-sharded rank
        assert inter["ds_tp"] == tp * inter["monta/flat"], (name, inter)
        assert inter["monta/dedup"] <= inter["monta/flat"] <= inter["alltoall"], (name, inter)
        for label, row in rows.items():
            assert row["routing_check"] and row["same_routing_as_others"], (name, label)
