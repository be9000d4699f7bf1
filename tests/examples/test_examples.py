"""Launch scripts parse (`bash -n`) and print their resolved command with `--dry-run`."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = sorted((REPO / "examples").rglob("*.sh")) + sorted((REPO / "examples").rglob("*.sbatch"))


def dry_run(script, **env) -> subprocess.CompletedProcess:
    """``bash SCRIPT --dry-run``, this interpreter as $PYTHON (auto_plan.sh runs the planner)."""
    return subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True,
                          timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_dry_run_prints_the_command(script):
    done = dry_run(script)
    assert done.returncode == 0, done.stderr
    assert "pretrain_moe.py" in done.stdout and "layout:" in done.stdout
    assert "--tensor-model-parallel-size" in done.stdout


def test_quickstart_is_what_make_demo_runs():
    makefile = (REPO / "Makefile").read_text()
    assert "examples/quickstart_cpu.sh" in makefile


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_dry_run_layout_passes_validation(script):
    """The printed flags are a valid configuration for the printed world size."""
    import re

    from monta.training.arguments import parse_args
    from monta.training.validation import validate_batch, validate_model, validate_parallel_dims

    out = dry_run(script).stdout
    words = shlex.split(out.splitlines()[-1])
    flags = words[words.index("pretrain_moe.py") + 1:]
    nodes = re.search(r"(\d+) nodes? x (\d+)", out) or re.search(r"world=(\d+)", out)
    world = int(nodes.group(1)) * int(nodes.group(2)) if nodes.lastindex == 2 else int(
        nodes.group(1))
    args = parse_args(flags)
    dims = validate_parallel_dims(args, world)
    validate_model(args, dims)
    validate_batch(args, dims)


AUTO_PLAN = REPO / "examples" / "auto_plan.sh"


@pytest.mark.parametrize("env, layout, plan_args", [
    # the MoNTA paper's cluster and model, its TP8 · EP2 layout: the planner picks the dispatcher
    ({"CLUSTER": "a800_hdr200", "MODEL": "paper-2x70b", "NNODES": "2", "SEQ_LENGTH": "8192",
      "GLOBAL_BATCH_SIZE": "16", "PLAN_ARGS": "--tp 8 --ep 2 --no-memory-check"},
     "layout: world=16 (2 nodes x 8) TP=8 PP=1 EP=2 ETP=8 DP=2",
     ["--tp", "8", "--ep", "2", "--no-memory-check", "--world", "16"]),
    # the model as pretrain_moe.py flags, on the CPU testbed spec (2 nodes x 2 ranks)
    ({"CLUSTER": "testbed_1gbit", "SEQ_LENGTH": "128", "GLOBAL_BATCH_SIZE": "16",
      "MICRO_BATCH_SIZE": "4", "MODEL": "--num-layers 4 --hidden-size 128 "
                                        "--num-attention-heads 4 --num-experts 8 "
                                        "--moe-router-topk 2"},
     "layout: world=4 (2 nodes x 2)", []),
], ids=["paper-2x70b", "model-flags"])
def test_auto_plan_launches_the_planners_pick(env, layout, plan_args):
    done = dry_run(AUTO_PLAN, **env)
    assert done.returncode == 0, done.stderr
    assert layout in done.stdout and done.stdout.startswith("plan: ")
    # the same question asked of tools/plan.py directly
    plan = subprocess.run(
        [sys.executable, "tools/plan.py", "--cluster", env["CLUSTER"], f"--model={env['MODEL']}",
         "--json", "-", "--seq-length", env["SEQ_LENGTH"], "--micro-batch-size",
         env.get("MICRO_BATCH_SIZE", "1"), "--global-batch-size", env["GLOBAL_BATCH_SIZE"],
         *plan_args], capture_output=True, text=True, timeout=60, cwd=REPO, check=True)
    best = json.loads(plan.stdout)["best"]
    words = shlex.split(done.stdout.splitlines()[-1])
    assert words[:2] == ["torchrun", "--nnodes"]
    assert words[words.index("--nproc-per-node") + 1] == str(best["ranks_per_node"])
    start = words.index("pretrain_moe.py") + 1
    assert words[start:start + len(best["flags"])] == best["flags"]
    assert f"plan: {best['label']} on {env['CLUSTER']}" in done.stdout


def test_auto_plan_stops_when_nothing_fits():
    # a 2x70B model cannot fit the CPU testbed's memory in any layout
    done = dry_run(AUTO_PLAN, CLUSTER="testbed_1gbit", MODEL="paper-2x70b")
    assert done.returncode == 1
    assert "error: no strategy fits" in done.stderr and "tools/plan.py found no plan" in done.stderr
    assert "torchrun" not in done.stdout
