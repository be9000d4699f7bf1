"""Run a function on ``world_size`` local gloo ranks and collect what each returns.

Tests and benchmarks use :func:`run_distributed` to spawn one process per rank on this host::

    def _rank_body(rank: int, world_size: int, scale: float) -> float:
        t = torch.full((1,), float(rank))
        torch.distributed.all_reduce(t)
        return t.item() * scale

    results = run_distributed(_rank_body, 4, 2.0, timeout_s=60)   # [12.0, 12.0, 12.0, 12.0]

``fn`` must be importable by name (a module-level function), since ranks are started with the
``spawn`` method. Each rank imports torch and whatever ``fn``'s module imports (megatron-core:
~5 s on 2 cores), so run many cases inside one job rather than one job per case.

Failure handling, so a broken collective never hangs the test session:
  1) a rank that raises is reported at once as a ``RuntimeError`` with its traceback, and the other
     ranks (likely blocked in a collective with it) are killed with their process groups;
  2) a rank that dies without a result (segfault, ``os._exit``) is reported the same way;
  3) ranks still running after ``timeout_s`` are sent ``SIGUSR1`` (``faulthandler`` dumps their
     stacks), then killed; the ``TimeoutError`` names them, says which were inside a
     ``torch.distributed`` call (usually waiting for the others) and quotes each one's stack;
  4) ranks exit by themselves if the parent process dies.
The gloo timeout is ``timeout_s`` plus a margin, so the harness, not gloo, reports hangs. Results
travel as pickle files in a temporary directory, so a rank may exit right after reporting; a
master port taken between choosing and binding it is retried on another port.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

logger = logging.getLogger(__name__)

# Extra seconds of gloo timeout beyond the harness timeout (see the module docstring).
_PG_TIMEOUT_MARGIN_S = 60.0
# Time the ranks get to write their stacks after SIGUSR1.
_STACK_DUMP_WAIT_S = 1.0
# Tries when the master port is taken between choosing and binding it.
_PORT_ATTEMPTS = 3
# Lines of each stuck rank's stack dump quoted in the TimeoutError.
_STACK_LINES = 12

# os.environ is process-global: serialise the set-spawn-restore dance around Process.start().
_ENV_LOCK = threading.Lock()


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; it may be taken again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _watch_parent(parent_pid: int) -> None:
    """Exit this rank when the process that spawned it is gone (it can no longer read results)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(1.0)


def _write_atomic(path: str, blob: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def _flush_and_exit(code: int) -> None:
    """Leave without interpreter teardown (~2 s with torch and megatron loaded on 2 cores, and
    gloo teardown can block when peers are gone): the result is already on disk."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple,
    workdir: str,
    pg_timeout_s: float,
    parent_pid: int,
) -> None:
    """Body of one spawned rank: init gloo, run ``fn``, write ``("ok", result)`` or
    ``("error", traceback_text)`` to ``workdir/rank{rank}.pkl``."""
    # Own process group, so the parent can kill this rank and anything it started at once.
    try:
        os.setsid()
    except OSError:
        logger.warning("rank %d: os.setsid() failed; its children may outlive a kill", rank)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    # Kept open until the process exits: faulthandler writes to it from a signal handler.
    stack_file = open(os.path.join(workdir, f"rank{rank}.stack"), "w")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result_path = os.path.join(workdir, f"rank{rank}.pkl")
    try:
        dist.init_process_group(
            backend="gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
    except BaseException:  # noqa: BLE001 - e.g. the port was taken since find_free_port()
        _write_atomic(result_path, pickle.dumps(("init_error", traceback.format_exc())))
        _flush_and_exit(1)
    try:
        result = fn(rank, world_size, *args)
        blob = pickle.dumps(("ok", result))  # inside the try: an unpicklable result is an error
    except BaseException:  # noqa: BLE001 - every failure must reach the parent as text
        _write_atomic(result_path, pickle.dumps(("error", traceback.format_exc())))
        _flush_and_exit(1)
    _write_atomic(result_path, blob)
    if dist.is_initialized():
        dist.destroy_process_group()
    _flush_and_exit(0)


def _kill_ranks(procs: list[multiprocessing.Process]) -> None:
    """SIGKILL each live rank's process group (the rank and anything it spawned), then reap."""
    for proc in procs:
        if proc.is_alive():  # not yet reaped, so the pid is still this rank's
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()  # killed before its os.setsid(): no group of its own yet
    for proc in procs:
        proc.join(timeout=5.0)


def _read_result(workdir: str, rank: int) -> tuple | None:
    path = os.path.join(workdir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _main_stack(workdir: str, rank: int) -> list[str]:
    """Frames of the rank's working thread from its faulthandler dump, innermost first."""
    try:
        with open(os.path.join(workdir, f"rank{rank}.stack")) as f:
            text = f.read()
    except OSError:
        return []
    # One block per thread, each headed "Thread 0x..." or "Current thread 0x...".
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text.strip())
    for block in blocks:
        frames = [line.strip() for line in block.splitlines()[1:] if line.strip()]
        if frames and not any("_watch_parent" in frame for frame in frames):
            # Drop the harness's own frames (from _rank_main outwards).
            inner = [i for i, frame in enumerate(frames) if frame.endswith(" in _rank_main")]
            return frames[: inner[0]] if inner else frames
    return []


def _spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple,
    workdir: str,
    timeout_s: float,
    env: dict[str, str] | None,
) -> list[multiprocessing.Process]:
    """Start one spawned process per rank, all pointed at a fresh master port."""
    ctx = multiprocessing.get_context("spawn")
    port = find_free_port()
    base_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",  # 4 ranks on 2 cores: more threads only contend
    }
    procs = []
    # Environment variables must be in place when the child interpreter starts (imports can read
    # them), so they are set in os.environ around start() rather than inside the rank.
    with _ENV_LOCK:
        saved = dict(os.environ)
        try:
            for rank in range(world_size):
                os.environ.update(base_env)
                os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank)})
                os.environ.update(env or {})
                proc = ctx.Process(
                    target=_rank_main,
                    args=(fn, rank, world_size, args, workdir,
                          timeout_s + _PG_TIMEOUT_MARGIN_S, os.getpid()),
                    name=f"monta-rank{rank}",
                    daemon=True,
                )
                proc.start()
                procs.append(proc)
        except BaseException:
            _kill_ranks(procs)
            raise
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return procs


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    Each rank has ``torch.distributed`` initialised (gloo, ``env://`` on 127.0.0.1 and a free
    port) before ``fn`` runs, and ``OMP_NUM_THREADS`` threads (default 1).

    Args:
        fn: a module-level function ``fn(rank, world_size, *args) -> picklable``.
        world_size: number of ranks.
        *args: picklable arguments passed to every rank.
        timeout_s: wall-clock limit for the whole job, spawn and imports included.
        env: extra environment variables for the ranks (override the defaults above).

    Returns:
        ``[result of rank 0, ..., result of rank world_size-1]``.

    Raises:
        RuntimeError: a rank raised (the message holds its traceback) or died without a result.
        TimeoutError: some ranks were still running after ``timeout_s``; the message names them
            and quotes their stacks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        pickle.dumps((fn, args))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(
            f"run_distributed: fn {fn!r} and args must be picklable (fn a module-level function)"
        ) from exc
    deadline = time.monotonic() + timeout_s
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        try:
            return _run_once(fn, world_size, args, deadline, timeout_s, env)
        except _PortTaken as exc:
            logger.warning("run_distributed attempt %d: %s; retrying on another port", attempt, exc)
    raise RuntimeError(f"run_distributed: no free port after {_PORT_ATTEMPTS} attempts")


class _PortTaken(Exception):
    """The master port was taken between find_free_port() and the store binding it."""


def _run_once(fn, world_size, args, deadline, timeout_s, env) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="monta-dist-") as workdir:
        procs = _spawn_ranks(fn, world_size, args, workdir, timeout_s, env)
        results: dict[int, Any] = {}
        try:
            while len(results) < world_size:
                running = {p.sentinel: rank for rank, p in enumerate(procs) if rank not in results}
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _timeout_error(procs, sorted(running.values()), workdir, timeout_s)
                for sentinel in multiprocessing.connection.wait(list(running), timeout=remaining):
                    rank = running[sentinel]
                    procs[rank].join()
                    results[rank] = _result_or_raise(workdir, rank, procs[rank], world_size, fn)
        finally:
            _kill_ranks(procs)
    return [results[rank] for rank in range(world_size)]


def _result_or_raise(workdir, rank, proc, world_size, fn) -> Any:
    payload = _read_result(workdir, rank)
    if payload is None:
        raise RuntimeError(
            f"rank {rank} of {world_size} {_describe_exit(proc.exitcode)} without a result "
            f"in {fn.__qualname__} (its stderr may say why)"
        )
    status, value = payload
    if status == "init_error" and re.search(r"EADDRINUSE|address already in use", value, re.I):
        raise _PortTaken(f"rank {rank}: master port in use")
    if status != "ok":
        raise RuntimeError(f"rank {rank} of {world_size} raised in {fn.__qualname__}:\n{value}")
    return value


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def _timeout_error(
    procs: list[multiprocessing.Process], stuck: list[int], workdir: str, timeout_s: float
) -> TimeoutError:
    """Ask the stuck ranks for their stacks (SIGUSR1 → faulthandler), then build the error."""
    for rank in stuck:
        if procs[rank].is_alive():
            try:
                os.kill(procs[rank].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
    time.sleep(_STACK_DUMP_WAIT_S)
    stacks = {rank: _main_stack(workdir, rank) for rank in stuck}
    # Ranks blocked inside torch.distributed are usually waiting for the others named here.
    in_collective = [r for r in stuck if stacks[r] and "torch/distributed/" in stacks[r][0]]
    elsewhere = [r for r in stuck if r not in in_collective]
    text = "\n".join(
        f"  rank {rank}:\n"
        + ("\n".join(f"    {frame}" for frame in stacks[rank][:_STACK_LINES]) or "    (no dump)")
        for rank in stuck
    )
    return TimeoutError(
        f"ranks {stuck} of {len(procs)} still running after {timeout_s:.1f} s; killed. "
        f"Inside a torch.distributed call: {in_collective}; elsewhere: {elsewhere}. "
        f"Stacks at the timeout (innermost frame first):\n{text}"
    )
