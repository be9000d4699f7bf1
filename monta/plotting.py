"""matplotlib for writing files: the headless backend, and one message where it is missing.

Every plot in the repo (planner, bench_comm, benchmarks, ``tools/plot_run.py``) is a PNG written
on machines without a display, and matplotlib is a soft dependency of the benchmarks.
"""

from __future__ import annotations

from pathlib import Path


def skipped(path: str | Path) -> str:
    return f"matplotlib is not importable: skipped the plot {path} (pip install matplotlib)"


def pyplot(path: str | Path, required: bool = False):
    """``matplotlib.pyplot`` on the Agg backend (files only); None when matplotlib is missing,
    or ImportError naming ``path`` when the caller cannot do without the plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        if required:
            raise ImportError(skipped(path)) from error
        return None
    return plt
