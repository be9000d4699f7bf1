"""The host-load probes the benchmarks use to call a timing clean or not."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest

from monta.testbed.hostload import cpu_busy_seconds, load_averages, own_cpu_seconds

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_own_and_host_busy_seconds_see_this_process_work():
    own0, busy0 = own_cpu_seconds(children=False), cpu_busy_seconds()
    _burn(0.3)
    assert own_cpu_seconds(children=False) - own0 >= 0.29
    # the host's busy time includes ours (tick granularity: 1/CLK_TCK)
    assert cpu_busy_seconds() - busy0 >= 0.25


def test_finished_children_count_only_when_asked():
    with_children, alone = own_cpu_seconds(), own_cpu_seconds(children=False)
    subprocess.run([sys.executable, "-c",
                    "import time\nend = time.process_time() + 0.3\n"
                    "while time.process_time() < end: pass"], check=True, timeout=60)
    assert own_cpu_seconds() - with_children >= 0.29
    assert own_cpu_seconds(children=False) - alone < 0.25


def test_load_averages_are_three_finite_numbers():
    loads = load_averages()
    assert len(loads) == 3 and all(math.isfinite(v) and v >= 0 for v in loads)
