"""The emulated multi-node testbed: N network namespaces on one host, joined by rate-capped links.

Command line (see :mod:`monta.testbed.launcher` for the details)::

    python -m monta.testbed --nodes 2 --ranks-per-node 2 --inter-gbit 1 -- python train.py

From Python (tests, benchmarks)::

    available, reason = testbed_available()        # cached probe; skip with `reason` when False
    result = run_on_testbed(["python", "-m", "monta.testbed.probe_worker", "throughput", ...],
                            nodes=2, ranks_per_node=2, inter_gbit=1.0, timeout_s=120)
    result.returncode, result.output, result.link_bytes["total_tx_bytes"]
"""

from monta.testbed.launcher import TestbedResult, main, run_on_testbed
from monta.testbed.netns import EXIT_UNAVAILABLE, Layout, testbed_available
from monta.testbed.supervisor import EXIT_TIMEOUT

__all__ = ["EXIT_TIMEOUT", "EXIT_UNAVAILABLE", "Layout", "TestbedResult", "main",
           "run_on_testbed", "testbed_available"]
