"""The watchdog, fault injection, the non-finite counter and dropped-token counting, one piece at
a time (the fault drill, tests/tools/test_fault_drill.py, runs them together in real jobs)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from monta.training import fault_injection
from monta.training.step_guard import NonFiniteCounter, StepOutcome
from monta.training.watchdog import (
    PHASE,
    Phase,
    Watchdog,
    _process_state,
    is_collective_failure,
    say,
)

from tests.conftest import REPO


def run_script(body: str, timeout: float = 60, signal_after_ready: int | None = None):
    """Run ``body`` in a fresh interpreter; optionally signal it once it prints 'ready'."""
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(body)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    start = time.monotonic()
    if signal_after_ready is not None:
        assert process.stdout.readline().strip() == "ready"
        start = time.monotonic()
        process.send_signal(signal_after_ready)
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out, time.monotonic() - start


def test_phase_names_say_where_a_rank_is():
    phase = Phase()
    phase.iteration = 5
    phase.enter("dispatch", 3)
    assert phase.describe() == "MoE dispatch, layer 3 (forward), iteration 5"
    phase.enter("save_commit")
    assert phase.describe() == "checkpoint save (manifest and commit), iteration 5"


def test_phase_marker_costs_attribute_writes_only():
    """Set ~10 times per layer per micro-batch: it must stay far below a step's milliseconds
    (about 0.2 µs on an idle core; the bound leaves room for a loaded test machine)."""
    phase, calls = Phase(), 100_000
    start = time.perf_counter()
    for _ in range(calls):
        phase.enter("dispatch", 2)
    assert (time.perf_counter() - start) / calls < 20e-6
    assert PHASE.hook is None  # fault injection is off unless MONTA_FAULT_INJECT is set


def test_say_writes_whole_lines_and_follows_redirection(capfd):
    import contextlib
    import io

    say("rank 3: one line")
    assert capfd.readouterr().err == "rank 3: one line\n"
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):  # the CLI cases capture errors this way
        say("error: two")
    assert buffer.getvalue() == "error: two\n"


def test_collective_failures_are_told_from_bugs():
    assert is_collective_failure(RuntimeError(
        "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:45712: Connection reset by "
        "peer"))
    assert is_collective_failure(RuntimeError("Timed out waiting 8000ms for send operation"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_failure(ValueError("connection reset"))


def test_no_progress_for_the_timeout_exits_3_naming_the_phase():
    code, out, elapsed = run_script("""
        import time
        from monta.training.watchdog import PHASE, Watchdog
        PHASE.iteration = 7
        PHASE.enter("combine", 2)
        Watchdog(timeout_s=1.0, graceful_sigterm=False, rank=3, world_size=4).start()
        time.sleep(60)
    """)
    assert code == 3, out
    assert ("rank 3: MoE combine, layer 2 (forward), iteration 7: timed out, no progress for "
            in out and "exiting with code 3" in out), out
    assert "rendezvous store unreachable" in out  # no process group in this test


def test_sigterm_without_exit_signal_handler_exits_143_at_once():
    code, out, elapsed = run_script("""
        import time
        from monta.training.watchdog import PHASE, Watchdog
        PHASE.enter("backward")
        Watchdog(timeout_s=600, graceful_sigterm=False, rank=0, world_size=1).start()
        print("ready", flush=True)
        time.sleep(60)  # like a rank blocked in a collective: Python handlers cannot run
    """, signal_after_ready=signal.SIGTERM)
    assert code == 143, out
    assert "rank 0: received SIGTERM during backward; no --exit-signal-handler" in out
    assert elapsed < 10


def test_sigterm_with_exit_signal_handler_is_left_to_the_train_loop():
    code, out, _ = run_script("""
        import time
        from monta.training.watchdog import PHASE, Watchdog
        watchdog = Watchdog(timeout_s=600, graceful_sigterm=True, rank=0, world_size=1).start()
        print("ready", flush=True)
        for _ in range(300):
            PHASE.enter("forward")  # training goes on
            if watchdog.sigterm_received:
                time.sleep(1.5)  # the watchdog checked for dead peers meanwhile
                watchdog.stop()
                print("saving and exiting", flush=True)
                break
            time.sleep(0.05)
    """, signal_after_ready=signal.SIGTERM)
    assert code == 0 and "saving and exiting" in out, out


@pytest.fixture
def store():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5),
                           wait_for_workers=False)
    yield dist.PrefixStore("monta_watchdog", master)


def test_peers_are_named_from_pids_and_heartbeats(store, monkeypatch):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stopped = subprocess.Popen(["sleep", "60"])
    os.kill(stopped.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10  # the stop takes effect asynchronously
    while _process_state(stopped.pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        host = socket.gethostname()
        store.set("pid/1", f"{host} {dead.pid}")
        store.set("pid/2", f"{host} {stopped.pid}")
        store.set("pid/3", f"{host} {os.getpid()}")  # alive and beating
        store.set("pid/4", "elsewhere 12345")  # another node, silent for a minute
        store.set("pid/5", f"{host} {dead.pid}")  # gone, but it said goodbye first
        store.set("exit/5", "failed")
        now = time.time()
        store.set("beat/1", f"{now - 1:.3f}|forward, iteration 3")
        store.set("beat/3", f"{now:.3f}|backward, iteration 3")
        store.set("beat/4", f"{now - 60:.3f}|MoE dispatch, layer 1 (forward), iteration 3")
        monkeypatch.setattr(Watchdog, "_connect_store", lambda self: store)
        watchdog = Watchdog(timeout_s=6.0, graceful_sigterm=False, rank=0, world_size=6)
        watchdog._store = store
        failed = watchdog._scan_peers()
    finally:
        stopped.kill()
        stopped.wait()
    assert len(failed) == 3, failed
    assert failed[0].startswith(f"rank 1: process {dead.pid} is gone; its last heartbeat")
    assert "was in forward, iteration 3" in failed[0]
    assert failed[1].startswith(f"rank 2: process {stopped.pid} is stopped")
    assert failed[2].startswith("rank 4: no heartbeat for 60 s") and "MoE dispatch" in failed[2]


def test_fault_specs_parse_and_refuse_typos():
    faults = fault_injection.parse(
        "kill@rank=1,iter=3,phase=dispatch,layer=2; nan@iter=5,layer=1,count=3;"
        "collapse@iter=2;diskfull@iter=4,rank=0;kill@rank=0,iter=2,phase=combine,signal=STOP")
    assert [f.kind for f in faults] == ["kill", "nan", "collapse", "diskfull", "kill"]
    assert str(faults[0]) == "kill@rank=1,iter=3,phase=dispatch,layer=2"
    nan = faults[1]
    assert [nan.acts_at(i, rank=0, layer=1) for i in (4, 5, 7, 8)] == [False, True, True, False]
    assert not nan.acts_at(5, rank=0, layer=2)
    for bad, why in (("kill@iter=3,phase=forward", "kill needs rank"),
                     ("kill@rank=1,iter=3,phase=fwd", "kill needs rank"),
                     ("nan@iter=3", "nan needs layer"), ("boom@iter=1", "unknown fault kind"),
                     ("nan@iter=3,layer=1,colour=red", "knows rank"), ("nan@iter", "key=value")):
        with pytest.raises(ValueError, match=why):
            fault_injection.parse(bad)


def test_injected_disk_full_is_an_enospc_on_the_chosen_rank():
    injector = fault_injection.FaultInjector(fault_injection.parse("diskfull@iter=4,rank=1"), 1)
    injector.check_save(2)
    with pytest.raises(OSError) as error:
        injector.check_save(4)
    assert error.value.errno == errno.ENOSPC
    fault_injection.FaultInjector(injector.faults, 0).check_save(4)  # other ranks write fine


def test_injected_kill_fires_on_the_named_phase(tmp_path):
    log = tmp_path / "faults.log"
    code, out, _ = run_script(f"""
        import os
        os.environ["MONTA_FAULT_LOG"] = {str(log)!r}
        from monta.training import fault_injection
        from monta.training.watchdog import PHASE
        injector = fault_injection.FaultInjector(
            fault_injection.parse("kill@rank=2,iter=3,phase=dispatch,layer=2"), rank=2)
        PHASE.hook = injector.on_phase
        for iteration in (1, 2, 3):
            PHASE.iteration = iteration
            for layer in (1, 2):
                PHASE.enter("dispatch", layer)
                print(iteration, layer, flush=True)
    """)
    assert code == -signal.SIGKILL
    assert out.split() == ["1", "1", "1", "2", "2", "1", "2", "2", "3", "1"]
    assert "kill@rank=2,iter=3,phase=dispatch,layer=2 rank=2" in log.read_text()


def test_nonfinite_counter_counts_runs_and_remembers_the_last_good_step():
    counter = NonFiniteCounter(limit=3, start_iteration=10)
    good, bad = StepOutcome(True, False, 1.0, False), StepOutcome(False, True, float("nan"), False)
    assert [counter.record(i, o) for i, o in
            [(11, bad), (12, good), (13, bad), (14, bad)]] == [False, False, False, False]
    assert counter.record(15, bad) and counter.last_good == 12
    message = counter.abort_message(15, "ckpt/iter_0000015")
    assert "3 consecutive iterations (13-15)" in message
    assert "weights and optimizer from iteration 12" in message


def test_dropped_tokens_are_counted_without_leaving_the_device():
    from monta.training.metrics import ExpertLoadTracker

    tracker = ExpertLoadTracker([], num_layers=2, num_experts=4, count_dropped=True)
    # 3 tokens, top-2: 6 assignments; capacity dropping kept 4 (non-zero probabilities)
    probs = torch.tensor([[0.6, 0.4, 0, 0], [0.5, 0, 0, 0], [0, 0, 0.7, 0]])
    routing_map = probs > 0
    tracker._hook(SimpleNamespace(layer_number=2, topk=2), None, (probs, routing_map))
    assert tracker.counts[1].tolist() == [2, 1, 1, 0, 2, 6]  # per expert, dropped, routed
    assert tracker.counts[0].sum() == 0


def test_expert_load_counts_the_routers_expert_order():
    """MoNTA's router on the one-rank path returns the expert order, not a [T, E] map."""
    from monta.dispatch.routed_order import route_in_expert_order
    from monta.training.metrics import ExpertLoadTracker

    tracker = ExpertLoadTracker([], num_layers=1, num_experts=4, count_dropped=True)
    logits = torch.tensor([[3.0, 2, 1, 0], [0, 1, 2, 3], [3, 0, 2, 1]])
    tracker._hook(SimpleNamespace(layer_number=1, topk=2), None,
                  route_in_expert_order(logits, 2))
    assert tracker.counts[0].tolist() == [2, 1, 2, 1, 0, 6]
