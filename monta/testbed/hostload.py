"""How busy the host is: the benchmarks' evidence that a timing was taken on a quiet machine.

Shared by ``tools/bench_comm.py`` (inside each rank) and ``bench/testbed_jobs.py`` (around each
testbed job): *foreign* CPU = the host's busy seconds (/proc/stat) minus this process tree's own,
so other users of the cores show up even when the load average has not caught up yet.
"""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path


def load_averages() -> list[float]:
    """The 1-, 5- and 15-minute load averages; nan where there is no /proc/loadavg."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [math.nan] * 3


def cpu_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy since boot, summed over cores (/proc/stat:
    user + nice + system + irq + softirq); nan where there is no /proc/stat."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq = ticks
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(children: bool = True) -> float:
    """CPU seconds of this process (all its threads: gloo's included) and, with ``children``,
    of every descendant that has finished (a launcher's ranks once the job is over)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (
            resource.RUSAGE_SELF,):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total
