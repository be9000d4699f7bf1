"""Launch scripts parse (`bash -n`) and print their resolved command with `--dry-run`."""

import subprocess

import pytest

from tests.conftest import REPO

SCRIPTS = sorted((REPO / "examples").rglob("*.sh")) + sorted((REPO / "examples").rglob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_dry_run_prints_the_command(script):
    done = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
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
    import shlex

    from monta.training.arguments import parse_args
    from monta.training.validation import validate_batch, validate_model, validate_parallel_dims

    out = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True,
                         timeout=60, cwd=REPO).stdout
    words = shlex.split(out.splitlines()[-1])
    flags = words[words.index("pretrain_moe.py") + 1:]
    nodes = re.search(r"(\d+) nodes? x (\d+)", out) or re.search(r"world=(\d+)", out)
    world = int(nodes.group(1)) * int(nodes.group(2)) if nodes.lastindex == 2 else int(
        nodes.group(1))
    args = parse_args(flags)
    dims = validate_parallel_dims(args, world)
    validate_model(args, dims)
    validate_batch(args, dims)
