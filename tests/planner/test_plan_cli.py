"""tools/plan.py end to end, in-process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plan.py"


def _main():
    spec = importlib.util.spec_from_file_location("plan_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_table_why_and_command(capsys):
    rc = _main()(["--cluster", "a800_hdr200", "--model", "paper-2x70b", "--seq-length", "8192",
                  "--global-batch-size", "16", "--tp", "8", "--ep", "2", "--etp", "8", "--pp",
                  "1", "--no-memory-check", "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "top 3 by predicted step time" in out and "why:" in out
    assert "vs ds_tp at the same layout: EP communication" in out
    assert "torchrun --nnodes 2 --nproc-per-node 8 pretrain_moe.py" in out
    assert "(DOES NOT FIT)" in out


def test_json_plot_and_model_flags(capsys, tmp_path):
    png = tmp_path / "plan.png"
    rc = _main()(["--cluster", "testbed_1gbit", "--json", "-", "--plot", str(png), "--top", "4",
                  "--", "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
                  "--num-experts", "8", "--moe-router-topk", "2", "--swiglu", "--seq-length",
                  "128", "--micro-batch-size", "4", "--global-batch-size", "16"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["ranked"]) == 4 and data["best"]["why"]
    assert data["best"]["command"].startswith("python -m monta.testbed --nodes 2")
    assert {p["name"] for p in data["best"]["phases"]} >= {"ep/inter", "compute/experts"}
    assert png.stat().st_size > 10_000


def test_errors_are_reported_not_raised(capsys):
    assert _main()(["--cluster", "nowhere", "--model", "mixtral-8x7b"]) == 2
    assert "neither a file nor a preset" in capsys.readouterr().err
