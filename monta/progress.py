"""One rule for every progress bar (training, preprocessing, conversion).

A bar draws only on a terminal: ``--no-progress-bar`` turns it off, and so does output that is
not a TTY (a log file, CI, a Slurm job), where tqdm's carriage returns would only add noise.
"""

from __future__ import annotations

from typing import Iterable


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs):
    """A ``tqdm`` bar over ``iterable`` (or a manual one with ``total=``).

    Args:
        enabled: False for ``--no-progress-bar``; True still disables it off a TTY
            (tqdm's ``disable=None`` checks ``file.isatty()``).
        kwargs: passed to ``tqdm`` (``desc``, ``total``, ``unit``, ``file``, ...).
    """
    from tqdm import tqdm

    kwargs.setdefault("mininterval", 1.0)  # a redraw per second is plenty, and cheap
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
