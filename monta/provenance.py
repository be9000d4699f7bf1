"""Which source a result came from, for the JSON that benchmarks and tools write.

A tree copied to another machine (the GPU host) may carry a stale ``.git`` or none, so the
caller's word wins: ``MONTA_GIT_COMMIT``, when set, is the commit. Otherwise git is asked, and
only when this package's parent directory is the top of a git work tree (a copy inside some
other repository must not report that repository's HEAD).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

COMMIT_ENV = "MONTA_GIT_COMMIT"
REPO = Path(__file__).resolve().parents[1]
UNKNOWN = "unknown"


def _git(*args: str) -> str | None:
    """``git args`` in REPO, stripped stdout; None if git fails or REPO is not a work tree's
    top."""
    try:
        def run(*argv: str) -> str:
            return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()

        if Path(run("rev-parse", "--show-toplevel")).resolve() != REPO:
            return None
        return run(*args)
    except (OSError, subprocess.SubprocessError):
        return None


def source_commit() -> str:
    """The commit of the running code: ``MONTA_GIT_COMMIT``, else REPO's HEAD, else
    ``"unknown"``."""
    return os.environ.get(COMMIT_ENV) or _git("rev-parse", "HEAD") or UNKNOWN


def source_dirty() -> bool | None:
    """Whether REPO's work tree has uncommitted changes; None when that cannot be told (the
    commit came from ``MONTA_GIT_COMMIT``, or there is no work tree)."""
    if os.environ.get(COMMIT_ENV):
        return None
    status = _git("status", "--porcelain")
    return None if status is None else bool(status)
