"""Launch scripts parse (`bash -n`) and print their resolved command with `--dry-run`."""

import subprocess

import pytest

from tests.conftest import REPO

SCRIPTS = sorted((REPO / "examples").rglob("*.sh"))


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
