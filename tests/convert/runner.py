"""Run the conversion tools as subprocesses, with hard timeouts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.conftest import REPO, RunResult, free_port


def run_command(command: list[str], timeout_s: float, env: dict | None = None) -> RunResult:
    """Run ``command`` from the repo root with a hard timeout (the whole process group is
    killed on expiry, torchrun's workers included)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        return RunResult(process.returncode, output, False)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return RunResult(-9, output, True)


def convert(*args: str, timeout_s: float = 240) -> RunResult:
    """``python tools/convert_checkpoint.py ARGS`` (it starts its own torchrun job)."""
    return run_command([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args,
                        "--no-progress-bar"], timeout_s)


def torchrun(script: str, nproc: int, *args: str, timeout_s: float = 240) -> RunResult:
    return run_command([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                        str(nproc), "--master-port", str(free_port()), str(REPO / script),
                        *args], timeout_s)
