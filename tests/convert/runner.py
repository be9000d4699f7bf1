"""Run the conversion tools as subprocesses, with hard timeouts."""

from __future__ import annotations

import sys

from tests.conftest import REPO, RunResult, free_port, run_command


def convert(*args: str, timeout_s: float = 240) -> RunResult:
    """``python tools/convert_checkpoint.py ARGS`` (it starts its own torchrun job)."""
    return run_command([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args,
                        "--no-progress-bar"], timeout_s)


def torchrun(script: str, nproc: int, *args: str, timeout_s: float = 240) -> RunResult:
    return run_command([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                        str(nproc), "--master-port", str(free_port()), str(REPO / script),
                        *args], timeout_s)
