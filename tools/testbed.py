"""Alias of ``python -m monta.testbed``: run a command as N x G ranks on the emulated cluster.

    python tools/testbed.py --nodes 2 --ranks-per-node 2 --inter-gbit 1 --timeout 120 -- \
        python -m monta.testbed.probe_worker throughput --out /tmp/throughput.json
"""

import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from monta.testbed.launcher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
