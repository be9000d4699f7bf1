"""Shared machinery of the benchmarks that run jobs on the emulated testbed (``monta.testbed``).

Used by ``bench/moe_ab.py`` and ``bench/planner_validation.py``:

* host-load accounting. On a host whose 2 cores other work shares, timings are noise; per job
  :func:`accounted` records the 1-minute load average before and after and the cores *other*
  processes kept busy meanwhile (host busy time from /proc/stat minus this process tree's CPU
  time), waits for a quiet host first (``wait_idle_s``) and reruns a job that other processes
  disturbed (``retries``). :func:`load_record` turns the per-job entries into the result's
  ``clean`` verdict. The options live in a :class:`LoadPolicy` (:func:`add_load_args` adds the
  command-line flags, :meth:`LoadPolicy.from_args` reads them back);
* :func:`train_on_testbed`: one ``pretrain_moe.py`` run on N × G testbed ranks, accounted,
  returning its TensorBoard scalars (``iteration-time``, ``moe-comm/*``, ``moe-time/*``) and
  the job's seconds;
* :func:`testbed_unavailable`: whether jobs can run here at all (and why not), before the first.

The result's header, flags and files (commit, machine, ``--out``, ``--plot``) are
:mod:`bench.harness`.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from bench.harness import REPO
from monta.testbed.hostload import cpu_busy_seconds, load_averages, own_cpu_seconds

PRETRAIN = REPO / "pretrain_moe.py"
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Host load
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadPolicy:
    """When a host counts as quiet, and what to do when it is not."""

    max_load: float = 1.5
    """Not clean when the 1-min load average before the first job exceeds this."""
    max_foreign_cores: float = 0.25
    """Not clean when other processes kept more cores than this busy during a job."""
    retries: int = 0
    """Rerun a job up to this many times while other processes used > max_foreign_cores."""
    wait_idle_s: float = 0.0
    """Before each job, wait up to this long for other processes to use <= max_foreign_cores
    (the first job also for the load average to drop to max_load)."""
    tag: str = "bench"
    """Prefix of progress lines."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, tag: str) -> "LoadPolicy":
        """From the flags :func:`add_load_args` adds."""
        return cls(args.max_load, args.max_foreign_cores, args.retries, args.wait_idle_s, tag)


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """--max-load, --max-foreign-cores, --retries, --wait-idle-s (see :class:`LoadPolicy`)."""
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="not clean when the 1-min load average before the first job "
                             "exceeds this")
    parser.add_argument("--max-foreign-cores", type=float, default=0.25,
                        help="not clean when other processes kept more cores than this busy "
                             "during any job, on average")
    parser.add_argument("--retries", type=int, default=0,
                        help="rerun a job up to this many times while other processes used more "
                             "than --max-foreign-cores during it")
    parser.add_argument("--wait-idle-s", type=float, default=0.0,
                        help="before each job, wait up to this long for other processes to "
                             "use <= --max-foreign-cores")


def load_average() -> float:
    return load_averages()[0]


def foreign_cores_now(window_s: float = 3.0) -> float:
    """Cores other processes keep busy right now (sampled over ``window_s``)."""
    busy0, own0 = cpu_busy_seconds(), own_cpu_seconds()
    time.sleep(window_s)
    return max(0.0, (cpu_busy_seconds() - busy0 - (own_cpu_seconds() - own0)) / window_s)


def accounted(name: str, policy: LoadPolicy, loads: list, run: Callable[[], T]) -> T:
    """Run ``run()`` (a testbed job) and append to ``loads`` the load average before/after and
    the cores other processes used meanwhile. Before each attempt wait up to
    ``policy.wait_idle_s`` for a quiet host; rerun up to ``policy.retries`` times while other
    processes used more than ``policy.max_foreign_cores`` (the discarded attempts stay in the
    record, marked ``discarded``). ``run`` must start afresh each time."""
    for attempt in range(policy.retries + 1):
        waited, start_wait = 0.0, time.perf_counter()
        while policy.wait_idle_s > 0:
            foreign = foreign_cores_now()
            waited = time.perf_counter() - start_wait
            # the run's first job also waits for the 1-min load average (the clean rule)
            quiet = foreign <= policy.max_foreign_cores and (
                bool(loads) or load_average() <= policy.max_load)
            if quiet or waited >= policy.wait_idle_s:
                break
            print(f"[{policy.tag}] waiting for a quiet host before {name}: other processes use "
                  f"{foreign:.2f} cores, 1-min load {load_average():.2f} "
                  f"({waited:.0f}/{policy.wait_idle_s:g} s)", flush=True)
            time.sleep(20)
        before, busy0, own0 = load_average(), cpu_busy_seconds(), own_cpu_seconds()
        t0 = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t0
        foreign = max(0.0, (cpu_busy_seconds() - busy0 - (own_cpu_seconds() - own0)) / seconds)
        entry = {"job": name, "attempt": attempt, "load_before": before,
                 "load_after": load_average(), "foreign_cpu_cores": round(foreign, 3),
                 "seconds": round(seconds, 1), "waited_s": round(waited, 1)}
        loads.append(entry)
        if foreign <= policy.max_foreign_cores or attempt == policy.retries:
            return out
        entry["discarded"] = True
        print(f"[{policy.tag}] {name}: other processes used {foreign:.2f} cores; retrying "
              f"({attempt + 1}/{policy.retries})", flush=True)
    raise AssertionError("unreachable")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that the testbed job in flight is stopped on the way
    out (``run_on_testbed`` starts its launcher in a session of its own)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def warn_if_loaded(policy: LoadPolicy) -> None:
    """Say up front when the timings are going to be noise (no waiting was asked for)."""
    first = load_average()
    if first > policy.max_load and policy.wait_idle_s <= 0:
        print(f"[{policy.tag}] warning: 1-min load average {first:.2f} > {policy.max_load:g}: "
              f"the timings will be noisy and the result is marked not clean", flush=True)


def load_record(loads: list[dict], policy: LoadPolicy) -> dict[str, Any]:
    """The result's load fields and ``clean`` verdict from :func:`accounted`'s entries."""
    first = loads[0]["load_before"]  # after any --wait-idle-s wait
    max_foreign = max(e["foreign_cpu_cores"] for e in loads if not e.get("discarded"))
    # later jobs start while this run's own previous job still weighs on the 1-min average:
    # the load average counts before the first job only, other processes' CPU for all of them
    return {"load_average": {"before_first_job": first, "per_job": loads},
            "foreign_cpu_cores_max": max_foreign,
            "clean": first <= policy.max_load and max_foreign <= policy.max_foreign_cores,
            "clean_rule": f"1-min load before the first job <= {policy.max_load:g} and other "
                          f"processes' CPU <= {policy.max_foreign_cores:g} cores during every job"}


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------
def testbed_unavailable(tag: str) -> bool:
    """Whether the testbed cannot run here (user / network namespaces or tc not allowed); when
    so, says why on stderr and the caller exits with ``monta.testbed.EXIT_UNAVAILABLE`` (77)."""
    from monta.testbed import testbed_available

    available, reason = testbed_available()
    if not available:
        print(f"[{tag}] testbed unavailable: {reason}", file=sys.stderr)
    return not available


def testbed_env() -> dict[str, str]:
    # megatron's TE/apex import warnings are printed by every rank before any filter can run
    return {"PYTHONWARNINGS": "ignore::UserWarning", "MONTA_LOG_LEVEL": "WARNING"}


def tensorboard_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar the run logged: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags().get("scalars", [])}


def median_after(series: dict[int, float], skip: int) -> float | None:
    """Median of the values logged after step ``skip`` (None when there are none)."""
    kept = [v for step, v in series.items() if step > skip]
    return statistics.median(kept) if kept else None


@dataclass(frozen=True)
class TrainingRun:
    """One ``pretrain_moe.py`` job on the testbed."""

    scalars: dict[str, dict[int, float]]
    """TensorBoard: tag -> {step: value}."""
    seconds: float
    """Wall time of the (kept) testbed job, start-up included."""
    output: str
    """The launcher's interleaved output."""

    def after(self, tag: str, skip: int) -> list[float]:
        """``tag``'s values after step ``skip``, in step order."""
        series = self.scalars.get(tag, {})
        return [series[s] for s in sorted(series) if s > skip]


def train_on_testbed(flags: list[str], *, name: str, inter_gbit: float, nodes: int,
                     ranks_per_node: int, timeout_s: float, policy: LoadPolicy,
                     loads: list) -> TrainingRun:
    """Run ``pretrain_moe.py FLAGS --tensorboard-dir TMP`` on the testbed, :func:`accounted`.

    Raises:
        RuntimeError: the job failed or timed out (its output's tail in the message).
    """
    from monta.testbed import run_on_testbed

    with tempfile.TemporaryDirectory(prefix="monta-train-") as tmp:
        tb_dir = Path(tmp) / "tb"
        command = [sys.executable, str(PRETRAIN), *flags, "--tensorboard-dir", str(tb_dir)]

        def train() -> Any:
            shutil.rmtree(tb_dir, ignore_errors=True)  # a retry starts afresh
            return run_on_testbed(command, nodes=nodes, ranks_per_node=ranks_per_node,
                                  inter_gbit=inter_gbit, timeout_s=timeout_s, env=testbed_env(),
                                  cwd=REPO)

        result = accounted(name, policy, loads, train)
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {result.returncode}"
                               f"{', timed out' if result.timed_out else ''}):\n"
                               f"{result.output[-4000:]}")
        return TrainingRun(tensorboard_scalars(tb_dir), loads[-1]["seconds"], result.output)
