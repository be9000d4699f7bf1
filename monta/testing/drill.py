"""Helpers for fault drills (``tools/fault_drill.py``): launch real ``torchrun pretrain_moe.py``
jobs with a hard timeout, watch their output line by line (time-stamped), signal their workers,
read back losses and checkpoints, and damage files on purpose.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]


class DrillFailure(AssertionError):
    """An expectation of a scenario did not hold; the message says which and what was seen."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise DrillFailure(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Job:
    """A finished job: exit code (None on a hard timeout), its output with arrival times."""

    rc: int | None
    lines: list[tuple[float, str]]
    started: float
    ended: float
    timed_out: bool = False

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 25) -> str:
        """The last lines, without warnings and tracebacks, for failure messages."""
        keep = [line for _, line in self.lines
                if not re.search(r"warn|Warning|^\s|Traceback|^\[rank", line)]
        return "\n    ".join(keep[-n:])

    def first(self, pattern: str) -> tuple[float, str] | None:
        for stamp, line in self.lines:
            if re.search(pattern, line):
                return stamp, line
        return None

    def all(self, pattern: str) -> list[tuple[float, str]]:
        return [(stamp, line) for stamp, line in self.lines if re.search(pattern, line)]


def worker_codes(job: Job) -> set[int]:
    """The training processes' exit codes from torchrun's failure summary (torchrun itself
    exits 1 whatever they were); SIGTERMs it sent while tearing the job down are left out."""
    return {int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", job.output)
            if int(code) != -signal.SIGTERM}


def worker_pids(launcher_pid: int) -> list[int]:
    """The training processes under a torchrun launcher (its python children)."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c.pid for c in children if "pretrain_moe.py" in " ".join(c.cmdline())]


def run_job(args: list[str], timeout_s: float, env: dict[str, str] | None = None,
            shell: Callable[[str], list[str]] | None = None,
            on_line: Callable[[str, subprocess.Popen], None] | None = None) -> Job:
    """``torchrun --nproc-per-node 4 pretrain_moe.py ARGS`` with a hard wall-clock limit.

    Args:
        args: pretrain_moe.py flags.
        timeout_s: past it the whole process group is SIGKILLed and ``timed_out`` set.
        env: extra environment variables (``MONTA_FAULT_INJECT`` ...).
        shell: ``shell(command_line)`` -> the argv that runs it (e.g. inside ``unshare -rm sh -c
            "mount ... && COMMAND"``).
        on_line: called with each output line as it arrives (to signal workers at a moment).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
               "--master-port", str(free_port()), str(REPO / "pretrain_moe.py"), *args]
    if shell is not None:
        import shlex

        command = shell(" ".join(shlex.quote(c) for c in command))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                            os.environ.get("PYTHONPATH")])),
                **(env or {})}
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace",
                               start_new_session=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in process.stdout:
            lines.append((time.time(), line.rstrip("\n")))
            if on_line is not None:
                on_line(line, process)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = process.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        rc, timed_out = None, True
        process.wait()
    ended = time.time()
    reader.join(timeout=10)
    return Job(rc, lines, started, ended, timed_out)


def processes_with_env(marker: str) -> list[int]:
    """Live processes whose environment mentions ``marker`` (a drill's workdir, which every
    job's ``MONTA_FAULT_LOG`` holds and every process it starts inherits)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def reap_leftovers(marker: str, grace_s: float = 3.0) -> list[str]:
    """Processes a finished job left behind (``marker`` as in :func:`processes_with_env`):
    waits ``grace_s`` for them to go, then SIGKILLs them by pid; returns their command lines."""
    deadline = time.monotonic() + grace_s
    while (pids := processes_with_env(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
            described.append(f"{pid}: {command[:120]}")
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    return described


def fault_log(path: Path) -> list[dict[str, str]]:
    """Entries of ``MONTA_FAULT_LOG``: ``{"time", "fault", "rank", "pid", "at_iter"}``."""
    entries = []
    if path.exists():
        for line in path.read_text().splitlines():
            stamp, fault, *fields = line.split()
            entries.append({"time": float(stamp), "fault": fault,
                            **dict(f.split("=", 1) for f in fields)})
    return entries


def scalars(tensorboard_dir: Path, tag: str) -> dict[int, float]:
    """One TensorBoard scalar series (exact float32 values) by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return {}
    return {e.step: e.value for e in events.Scalars(tag)}


def same_losses(reference: dict[int, float], run: dict[int, float],
                iterations: list[int]) -> str | None:
    """None when ``run`` equals ``reference`` bit for bit at ``iterations``, else why not."""
    missing = [i for i in iterations if i not in run]
    if missing:
        return f"iterations {missing} not logged (logged: {sorted(run)})"
    differ = [(i, run[i], reference.get(i)) for i in iterations if run[i] != reference.get(i)]
    if differ:
        return "losses differ from the uninterrupted run: " + ", ".join(
            f"iteration {i}: {a!r} vs {b!r}" for i, a, b in differ)
    return None


def tracker(root: Path) -> int | None:
    file = root / "latest_checkpointed_iteration.txt"
    return int(file.read_text().strip()) if file.exists() else None


def flip_byte(path: Path, offset_fraction: float = 0.5) -> None:
    """Invert one byte in the middle of ``path`` (same size: only a checksum can tell)."""
    with open(path, "r+b") as f:
        offset = int(os.path.getsize(path) * offset_fraction)
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def checkpoint_tensors_equal(a: Path, b: Path) -> str | None:
    """None when every tensor (weights and optimizer state) of two checkpoints is identical."""
    import torch

    from monta.convert.dcp_reader import CheckpointReader

    left, right = CheckpointReader(str(a)), CheckpointReader(str(b))
    if set(left.tensors) != set(right.tensors):
        return f"different tensors: {sorted(set(left.tensors) ^ set(right.tensors))[:5]}"
    differ = [key for key in sorted(left.tensors)
              if not torch.equal(left.read_full(key), right.read_full(key))]
    return f"tensors differ: {differ[:5]}" if differ else None


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
