"""Start the ranks of a testbed job, forward their output, and stop them all on failure.

Runs inside the testbed's namespaces (see :mod:`monta.testbed.launcher`). One thread, one
``select`` loop over every rank's stdout and stderr pipe:

  1) each rank is ``ip netns exec n<node> <command>`` in its own session (process group), with
     ``PR_SET_PDEATHSIG`` so it dies if this process dies, whatever kills it;
  2) every line a rank writes is forwarded as ``[rank R node N] line``, stdout to stdout and
     stderr to stderr;
  3) the first rank to exit non-zero sets the exit code; the others get SIGTERM, then SIGKILL
     after :data:`KILL_GRACE_S`;
  4) past the timeout every rank is stopped the same way and the exit code is 124; a signal to
     this process (Ctrl-C, SIGTERM) stops them too, exit code 128 + signal.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import BinaryIO

EXIT_TIMEOUT = 124  # like coreutils `timeout`
KILL_GRACE_S = 2.0  # SIGTERM -> SIGKILL
DRAIN_S = 2.0  # after the last rank exits, wait this long for pipes its children still hold
_POLL_S = 0.05
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (a ``preexec_fn``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def say(message: str) -> None:
    """One launcher line on stderr."""
    try:
        sys.stderr.write(f"testbed: {message}\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass


@dataclass
class _Rank:
    rank: int
    node: int
    proc: subprocess.Popen
    returncode: int | None = None
    open_pipes: int = 2
    partial: dict[int, bytes] = field(default_factory=dict)  # fd -> bytes after the last "\n"

    @property
    def label(self) -> str:
        return f"{self.rank} (node {self.node})"


def exit_code(returncode: int) -> int:
    """A Popen return code as a shell exit status (killed by signal s -> 128 + s)."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Runs one command per rank and waits for all of them (see the module docstring).

    Args:
        command: argv of every rank.
        placements: ``(netns, env)`` per global rank, in rank order.
        node_of_rank: node id of each rank (for the output prefix and messages).
    """

    def __init__(self, command: list[str], placements: list[tuple[str, dict[str, str]]],
                 node_of_rank: list[int]) -> None:
        self._command = command
        self._placements = placements
        self._node_of_rank = node_of_rank
        self._ranks: list[_Rank] = []
        self._signal: int | None = None
        self._out = {1: sys.stdout.buffer, 2: sys.stderr.buffer}

    def run(self, timeout_s: float | None) -> int:
        """Start every rank, supervise until all have exited; return the job's exit code."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        selector = selectors.DefaultSelector()
        for rank, (netns, env) in enumerate(self._placements):
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, *self._command], env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, preexec_fn=set_parent_death_signal,
            )
            r = _Rank(rank, self._node_of_rank[rank], proc)
            self._ranks.append(r)
            selector.register(proc.stdout, selectors.EVENT_READ, (r, 1))
            selector.register(proc.stderr, selectors.EVENT_READ, (r, 2))
        try:
            return self._loop(selector, timeout_s)
        finally:
            self._kill_all(signal.SIGKILL)  # leftovers of exited ranks' process groups
            selector.close()

    def _loop(self, selector: selectors.BaseSelector, timeout_s: float | None) -> int:
        start = time.monotonic()
        code: int | None = None  # decided when the job is stopped
        kill_at = drain_until = None
        while True:
            for key, _ in selector.select(_POLL_S):
                self._read(selector, key.fileobj, *key.data)
            now = time.monotonic()
            for r in self._ranks:
                if r.returncode is None and r.proc.poll() is not None:
                    r.returncode = r.proc.returncode
                    if r.returncode != 0 and code is None:
                        code = exit_code(r.returncode)
                        say(f"rank {r.label} exited with code {code}; stopping the other ranks")
                        kill_at = self._stop(now)
            running = [r for r in self._ranks if r.returncode is None]
            if code is None and self._signal is not None:
                code = 128 + self._signal
                say(f"interrupted by {signal.Signals(self._signal).name}; stopping ranks "
                    f"{', '.join(r.label for r in running)}")
                kill_at = self._stop(now)
            if code is None and timeout_s is not None and now - start > timeout_s:
                code = EXIT_TIMEOUT
                say(f"timeout after {timeout_s:g} s; ranks still running: "
                    f"{', '.join(r.label for r in running)}")
                kill_at = self._stop(now)
            if kill_at is not None and now > kill_at and running:
                self._kill_all(signal.SIGKILL)
                kill_at = None
            if not running:
                if not any(r.open_pipes for r in self._ranks):
                    break
                drain_until = drain_until or now + DRAIN_S
                if now > drain_until:
                    break
        for r in self._ranks:  # lines cut off by a kill or by children holding the pipe
            for fd, rest in r.partial.items():
                if rest:
                    self._emit(r, fd, rest + b"\n")
        return 0 if code is None else code

    def _read(self, selector: selectors.BaseSelector, pipe: BinaryIO, r: _Rank, fd: int) -> None:
        chunk = os.read(pipe.fileno(), 65536)
        if not chunk:
            selector.unregister(pipe)
            pipe.close()
            r.open_pipes -= 1
            rest = r.partial.pop(fd, b"")
            if rest:
                self._emit(r, fd, rest + b"\n")
            return
        data = r.partial.pop(fd, b"") + chunk
        cut = data.rfind(b"\n") + 1
        if cut:
            self._emit(r, fd, data[:cut])
        if cut < len(data):
            r.partial[fd] = data[cut:]

    def _emit(self, r: _Rank, fd: int, lines: bytes) -> None:
        prefix = f"[rank {r.rank} node {r.node}] ".encode()
        out = b"".join(prefix + line + b"\n" for line in lines[:-1].split(b"\n"))
        try:
            self._out[fd].write(out)
            self._out[fd].flush()
        except (BrokenPipeError, ValueError):
            pass

    def _stop(self, now: float) -> float:
        self._kill_all(signal.SIGTERM)
        return now + KILL_GRACE_S

    def _kill_all(self, sig: int) -> None:
        for r in self._ranks:
            try:
                os.killpg(r.proc.pid, sig)  # the rank's session: it and its children
            except (ProcessLookupError, PermissionError):
                pass

    def _on_signal(self, signum: int, _frame) -> None:
        if self._signal is None:
            self._signal = signum
