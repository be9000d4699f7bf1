"""Wall-clock time of each dispatcher phase, per layer, for the training log.

Bytes come from :mod:`monta.comm`'s counters; this adds the seconds. On CPU the time is exact;
on GPU it is host time unless ``MONTA_SYNC_TIMING=1`` (which synchronises around each phase and
so changes what it measures — use it for diagnosis, not for throughput runs).
"""

from __future__ import annotations

import functools
import os
import time
from collections import defaultdict

import torch

PHASE_SECONDS: dict[str, float] = defaultdict(float)
_SYNC = os.environ.get("MONTA_SYNC_TIMING") == "1"


def timed(phase: str):
    """Method decorator: add the call's duration to ``PHASE_SECONDS["layerL/<phase>"]``."""

    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            if _SYNC and torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = method(self, *args, **kwargs)
            if _SYNC and torch.cuda.is_available():
                torch.cuda.synchronize()
            PHASE_SECONDS[f"layer{self.layer_number or 0}/{phase}"] += time.perf_counter() - start
            return out

        return run

    return wrap


def take_phase_seconds() -> dict[str, float]:
    """The accumulated times since the last call, then reset."""
    snapshot = dict(PHASE_SECONDS)
    PHASE_SECONDS.clear()
    return snapshot
