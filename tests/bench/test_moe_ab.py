"""Smoke test of ``bench/moe_ab.py --quick`` on the emulated testbed (2 nodes × 2 ranks,
1 Gbit/s), at tiny sizes so it stays well under a minute on 2 cores: the JSON's structure, the
same routing for every candidate, and the inter-node byte counters ordered as DESIGN §2 says
(monta never sends more payload across nodes than stock alltoall; ds_tp sends TP × monta).
The timings of so small a run mean nothing and are not checked. The training comparison
(two more testbed jobs) runs only in the ``slow`` test. Skips with the testbed's reason where
network namespaces are not allowed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import monta.testbed as tb

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 150
TINY = ["--tokens", "128", "--hidden", "32", "--ffn-hidden", "16", "--train-seq-length", "64"]


@pytest.fixture(scope="module")
def testbed() -> None:
    available, reason = tb.testbed_available()
    if not available:
        pytest.skip(reason)


def _run(tmp_path: Path, *extra: str, jobs: int) -> dict:
    """``moe_ab.py --quick`` with each testbed job capped at JOB_TIMEOUT_S (the launcher stops
    its ranks), and the whole script at what those jobs may take (a launcher is killed 60 s
    after its own timeout)."""
    out = tmp_path / "moe_ab.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "moe_ab.py"), "--quick", *TINY,
                           "--timeout", str(JOB_TIMEOUT_S), "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=jobs * (JOB_TIMEOUT_S + 70) + 30)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.with_suffix(".md").exists()
    return json.loads(out.read_text())


def test_quick_layer_ab(testbed, tmp_path):
    result = _run(tmp_path, "--no-train", "--chunks", "1,2", jobs=1)
    assert result["benchmark"] == "moe_ab" and result["git_commit"]
    assert result["caps"] == [1.0] and result["training"] == []
    assert isinstance(result["clean"], bool) and result["load_average"]["per_job"]
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in result["rows"]:
        cases[(row["cap_gbit"], row["layout"]["name"], row["topk"])][row["label"]] = row
        assert len(row["layer_ms"]) == 2 and row["layer_ms_median"] > 0
        assert row["same_routing_as_others"], row["label"]
    assert {(layout, k) for _, layout, k in cases} == {
        (layout, k) for layout in ("TP1·EP4", "TP2·EP2·ETP2") for k in (2, 8)}
    for key, rows in cases.items():
        stock = rows["alltoall"]
        assert stock["inter_bytes"] > 0 and stock["speedup_vs_alltoall"] == 1.0
        assert rows["nocomm"]["inter_bytes"] == rows["nocomm"]["intra_bytes"] == 0
        montas = {label: row for label, row in rows.items() if label.startswith("monta/")}
        assert montas, key
        for label, row in montas.items():
            assert row["inter_bytes"] <= stock["inter_bytes"], (key, label)
            assert row["inter_bytes_vs_alltoall"] == row["inter_bytes"] / stock["inter_bytes"]
        if "ds_tp" in rows:  # every TP rank of ds_tp sends what one TP-sharded monta rank sends
            assert rows["ds_tp"]["inter_bytes"] == 2 * montas["monta/flat/c1"]["inter_bytes"]
        else:  # node dedup never sends more across nodes than one copy per owner rank
            assert montas["monta/dedup/c1"]["inter_bytes"] <= montas["monta/flat/c1"]["inter_bytes"]
    assert {s["topk"] for s in result["summary"]} == {2, 8}


@pytest.mark.slow
def test_quick_with_training(testbed, tmp_path):
    result = _run(tmp_path, "--layouts", "tp1ep4", "--chunks", "1", jobs=3)
    rows = {row["dispatcher"]: row for row in result["training"]}
    assert set(rows) == {"alltoall", "monta"} and all(r["topk"] == 8 for r in rows.values())
    for row in rows.values():
        assert row["iteration_ms_median"] > 0 and row["inter_bytes_per_step"] > 0
    # top-8 over 2 nodes: node dedup sends each token across once, stock up to 4 times
    assert rows["monta"]["inter_bytes_per_step"] < rows["alltoall"]["inter_bytes_per_step"]
