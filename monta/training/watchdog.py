"""Fail fast instead of hanging: a per-rank phase marker, a watchdog thread, one clear line.

Large jobs die in ways small ones don't: a rank is killed, a node vanishes mid-all-to-all. The
survivors must exit within ``--distributed-timeout-minutes`` saying what they were doing and
which peer is gone, never hang. Three paths lead to that line (:meth:`Watchdog.fail`):

1) a collective raises — gloo reports "Connection reset by peer" milliseconds after a peer dies,
   or "Timed out waiting ..." after the process-group timeout — and :func:`pretrain` hands the
   error to :meth:`Watchdog.fail`;
2) torchrun's agent sees a worker die and SIGTERMs the others: the watchdog thread learns of the
   signal through ``signal.set_wakeup_fd`` even while the main thread is blocked inside a C++
   collective (Python handlers only run between bytecodes), finds the dead peer and exits;
3) no phase change for the timeout (a hang that no collective reports): the watchdog thread
   exits.

The phase marker (:data:`PHASE`) costs three attribute writes per phase: no collective, no host
sync. The train loop, the MoE layer (:mod:`monta.dispatch.registry`) and the checkpoint code set
it. Peers are named from a registry in the job's rendezvous store (torchrun's agent hosts it, so
it outlives the workers): each rank's host and pid — a dead peer on this host has no process left
— and a heartbeat with its last phase, which a frozen or vanished remote peer stops refreshing.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, NoReturn

EXIT_PEER_FAILURE = 3
"""Exit code of a rank whose collective failed, timed out or made no progress."""
EXIT_SIGTERM = 128 + signal.SIGTERM
"""Exit code after SIGTERM without ``--exit-signal-handler`` (the shell's convention)."""

_PHASE_NAMES = {
    "setup": "setup",
    "load": "checkpoint load",
    "data": "building datasets",
    "forward": "forward",
    "backward": "backward",
    "route": "MoE routing, layer {layer}",
    "dispatch": "MoE dispatch, layer {layer} (forward)",
    "experts": "MoE experts, layer {layer} (forward)",
    "combine": "MoE combine, layer {layer} (forward)",
    "moe_backward": "MoE layer {layer} backward (combine, experts, dispatch)",
    "grad_reduce": "gradient all-reduce",
    "optimizer": "optimizer step",
    "log": "logging",
    "eval": "evaluation",
    "save": "checkpoint save (writing shards)",
    "save_commit": "checkpoint save (manifest and commit)",
    "done": "shutdown",
}
PHASE_KEYS = tuple(_PHASE_NAMES)


class Phase:
    """What this rank is doing now. :meth:`enter` is the whole per-phase cost.

    ``hook`` is None except under test-only fault injection (:mod:`monta.training.fault_injection`),
    which acts on phase entries.
    """

    __slots__ = ("key", "layer", "iteration", "since", "hook")

    def __init__(self) -> None:
        self.key, self.layer, self.iteration = "setup", 0, 0
        self.since = time.monotonic()
        self.hook: Callable[[str, int, int], None] | None = None

    def enter(self, key: str, layer: int = 0) -> None:
        self.key, self.layer, self.since = key, layer, time.monotonic()
        if self.hook is not None:
            self.hook(key, layer, self.iteration)

    def describe(self) -> str:
        name = _PHASE_NAMES.get(self.key, self.key).format(layer=self.layer)
        return f"{name}, iteration {self.iteration}" if self.iteration else name


PHASE = Phase()

_GLOO_FAILURES = ("connection reset", "connection closed", "timed out", "broken pipe",
                  "connection refused", "gloo", "nccl", "socket")


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from a broken or timed-out collective (not a bug in our code)."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(key in text for key in _GLOO_FAILURES)


def _short(error: BaseException) -> str:
    """The first line of an error, without gloo's source path prefix."""
    text = (str(error).strip().splitlines() or [""])[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    text = text.split(". ", 1)[0]  # gloo appends generic advice after the first sentence
    return f"{type(error).__name__}: {text[:200]}"


def say(line: str) -> None:
    """Write one line to stderr in a single ``write``: ranks share torchrun's pipe, and
    ``print`` (text, then newline) lets two ranks' lines run into each other."""
    text = line.rstrip("\n") + "\n"
    sys.stdout.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # redirected into a buffer (tools, tests)
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    sys.stderr.flush()
    os.write(fd, text.encode(errors="replace"))


def _process_state(pid: int) -> str | None:
    """``/proc`` state letter of a local process, or None when it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class Watchdog:
    """One per rank, between ``init_process_group`` and the end of the job.

    Args:
        timeout_s: ``--distributed-timeout-minutes`` in seconds: a phase that lasts longer is a
            hang.
        graceful_sigterm: ``--exit-signal-handler``: a SIGTERM with every peer alive asks the
            train loop to checkpoint and exit 0; without it SIGTERM exits at once (code 143).
        rank, world_size: this rank's place in the default process group.
    """

    def __init__(self, timeout_s: float, graceful_sigterm: bool, rank: int, world_size: int):
        self.timeout_s = timeout_s
        self.graceful_sigterm = graceful_sigterm
        self.rank, self.world_size = rank, world_size
        # heartbeat period: several per timeout, so a silent peer is told from a slow one
        self.beat_s = min(10.0, max(0.5, timeout_s / 6))
        self.sigterm_received = False
        self._store = None
        self._store_lock = threading.Lock()
        self._exit_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wakeup: tuple[int, int] | None = None
        self._old_handler = None
        self._old_wakeup = -1
        self._owns_signals = False
        self._host = socket.gethostname()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Watchdog":
        """Install the SIGTERM handler (main thread only), register, start the thread."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._wakeup = (read_fd, write_fd)
        # signals go to the main thread: from any other, leave SIGTERM alone
        self._owns_signals = threading.current_thread() is threading.main_thread()
        if self._owns_signals:
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm_main_thread)
            self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._store = self._connect_store()
        self._store_set(f"pid/{self.rank}", f"{self._host} {os.getpid()}")
        self._beat()
        self._thread = threading.Thread(target=self._run, name="monta-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """A clean end: tell peers this rank left on purpose, restore signal handling."""
        self._store_set(f"exit/{self.rank}", "finished")
        self._stop.set()
        if self._wakeup is not None:
            try:
                os.write(self._wakeup[1], b"\0")  # wake the thread's select now
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2 * self.beat_s)
        if self._wakeup is not None:
            if self._owns_signals:
                signal.set_wakeup_fd(self._old_wakeup)
                signal.signal(signal.SIGTERM, self._old_handler or signal.SIG_DFL)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def _connect_store(self):
        """A private client of the rendezvous store, with a short timeout of its own (a dead
        store must not stall the watchdog)."""
        import torch.distributed as dist

        try:
            store = dist.distributed_c10d._get_default_store().clone()
            store.set_timeout(timedelta(seconds=min(5.0, self.beat_s * 2)))
            return dist.PrefixStore("monta_watchdog", store)
        except Exception:  # noqa: BLE001 - no store: peers are then reported as unknown
            return None

    def _store_set(self, key: str, value: str) -> None:
        if self._store is None:
            return
        with self._store_lock:
            try:
                self._store.set(key, value)
            except Exception:  # noqa: BLE001 - the store's host may be gone; keep watching
                pass

    def _store_get(self, key: str) -> str | None:
        if self._store is None:
            return None
        with self._store_lock:
            try:
                if not self._store.check([key]):
                    return None
                return self._store.get(key).decode()
            except Exception:  # noqa: BLE001
                return None

    # --- the thread ------------------------------------------------------------------------

    def _on_sigterm_main_thread(self, signum, frame) -> None:
        # Runs only when the main thread is between bytecodes; the watchdog thread has already
        # been woken through the wakeup fd and decides what SIGTERM means.
        self.sigterm_received = True

    def _run(self) -> None:
        read_fd = self._wakeup[0]
        last_beat = time.monotonic()
        tick = min(1.0, self.beat_s / 2)
        while not self._stop.is_set():
            ready, _, _ = select.select([read_fd], [], [], tick)
            if ready:
                try:
                    received = os.read(read_fd, 64)
                except BlockingIOError:
                    received = b""
                if signal.SIGTERM in received:
                    self._handle_sigterm()
            now = time.monotonic()
            stalled = now - PHASE.since
            if stalled > self.timeout_s and not self._stop.is_set():
                self.fail("timed out", hang=True)
            if now - last_beat >= self.beat_s:
                self._beat()
                last_beat = now

    def _beat(self) -> None:
        self._store_set(f"beat/{self.rank}", f"{time.time():.3f}|{PHASE.describe()}")

    def _handle_sigterm(self) -> None:
        self.sigterm_received = True
        failed = self._failed_peers(wait_s=1.0)
        if failed:
            self.fail("stopped by SIGTERM (the launcher ends the job after a peer failed)",
                      failed=failed)
        if not self.graceful_sigterm:
            self._print(f"rank {self.rank}: received SIGTERM during {PHASE.describe()}; no "
                        f"--exit-signal-handler, so exiting without a checkpoint (code "
                        f"{EXIT_SIGTERM})")
            self._exit(EXIT_SIGTERM, "sigterm")
        # graceful: the train loop sees sigterm_received, saves and exits 0; if it stalls
        # instead, the no-progress timeout still ends the job.

    # --- peers -----------------------------------------------------------------------------

    def _failed_peers(self, wait_s: float) -> list[str]:
        """Describe the peers that look dead or frozen, polling up to ``wait_s`` for evidence
        (a killed process closes its sockets a moment before it becomes a zombie)."""
        deadline = time.monotonic() + wait_s
        while True:
            failed = self._scan_peers()
            if failed or time.monotonic() >= deadline:
                return failed
            time.sleep(0.1)

    def _scan_peers(self) -> list[str]:
        failed = []
        stale_s = 3 * self.beat_s + 1.0
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            evidence = []
            registered = self._store_get(f"pid/{peer}")
            if registered is not None:
                host, pid = registered.rsplit(" ", 1)
                if host == self._host:
                    state = _process_state(int(pid))
                    if state is None or state in "ZX":
                        evidence.append(f"process {pid} is gone")
                    elif state in "Tt":
                        evidence.append(f"process {pid} is stopped")
            beat = self._store_get(f"beat/{peer}")
            seen = ""
            if beat is not None:
                stamp, last = beat.split("|", 1)
                age = time.time() - float(stamp)
                if age > stale_s:
                    evidence.append(f"no heartbeat for {age:.0f} s")
                seen = f"; its last heartbeat, {age:.1f} s ago, was in {last}"
            # a peer that left through its own handler (it printed its own line) said so in the
            # store before exiting: read that after the evidence, or a peer exiting meanwhile
            # would pass for a dead one
            if evidence and self._store_get(f"exit/{peer}") is None:
                failed.append(f"rank {peer}: {', '.join(evidence)}{seen}")
        return failed

    # --- the one line ----------------------------------------------------------------------

    def fail(self, what: str, error: BaseException | None = None, hang: bool = False,
             failed: list[str] | None = None) -> NoReturn:
        """Print ``rank R: <phase>: <what>, after Ns ...; peer rank(s) X likely died (...)`` once
        and exit with :data:`EXIT_PEER_FAILURE`. Callable from any thread."""
        if not self._exit_lock.acquire(blocking=False):
            while True:  # another thread is already reporting and will exit the process
                time.sleep(1.0)
        elapsed = time.monotonic() - PHASE.since
        if failed is None:
            failed = self._failed_peers(wait_s=2.0 if not hang else 0.0)
        ranks = [entry.split(":", 1)[0].removeprefix("rank ") for entry in failed]
        if failed:
            timed_out = hang or (error is not None and "timed out" in str(error).lower())
            verb = "hung or died" if timed_out else "died"
            peers = f"peer rank(s) {', '.join(ranks)} likely {verb} ({'; '.join(failed)})"
        elif self._store is None:
            peers = "peer state unknown (rendezvous store unreachable)"
        else:
            peers = "no peer found dead (all registered, heartbeats fresh): a network problem?"
        cause = f" [{_short(error)}]" if error is not None else ""
        when = (f"no progress for {elapsed:.1f} s (limit {self.timeout_s:g} s: "
                f"--distributed-timeout-minutes {self.timeout_s / 60:g})" if hang
                else f"after {elapsed:.1f} s in this phase")
        self._print(f"rank {self.rank}: {PHASE.describe()}: {what}, {when}; {peers}; exiting "
                    f"with code {EXIT_PEER_FAILURE}{cause}")
        self._exit(EXIT_PEER_FAILURE, "failed")

    def _print(self, line: str) -> None:
        say(line)

    def _exit(self, code: int, why: str) -> NoReturn:
        self._store_set(f"exit/{self.rank}", why)
        sys.stdout.flush()
        sys.stderr.flush()
        # no interpreter teardown: gloo's threads and destructors can block (or abort) when
        # peers are gone, and nothing is left to save
        os._exit(code)
