"""The experts' weight gradients on a second CUDA stream, beside the input gradients.

In an expert projection's backward the input gradient ``dy @ w[e]ᵀ`` feeds the rest of the
backward and the weight gradient ``x[rows_e]ᵀ @ dy`` feeds only the optimizer, yet on one
stream each GEMM waits for the one before it to drain. Every GEMM ends in a partial last wave
of tiles that leaves SMs idle; on two streams the other chain's GEMM takes them.

Measured on an H200 in three runs, interleaved against ``0`` (``bench/gpu_moe.py``'s
``one_stream`` variants; docs/gpu_tier.md has the table): the fine-grained layer (64 experts)
ran ~6 % faster one pass at a time and 0–3 % back to back; at Mixtral shapes every difference
was inside the noise. Back to back, as training runs, it was never slower.

``MONTA_WGRAD_STREAM`` picks: ``1`` (default) the weight gradients on the side stream; ``0``
everything on the current stream. CUDA only; a CUDA graph capture takes the fork and join as
it takes any other cross-stream dependency.

Use::

    overlap = WgradOverlap(dy)          # forks: the side stream waits for the current one
    dx = ...                            # input gradient, current stream
    with overlap.side():                # weight gradient, side stream
        dw = ...
    overlap.join(dw)                    # the current stream waits; dw is safe to free there

A tensor the side stream reads must not be freed on the current stream before ``join`` (the
allocator would hand its memory out while the side stream still reads it): the callers keep
their inputs alive until they return, which comes after ``join``. Between forks, ``fork()``
again before the side stream reads something the current stream produced after the first.
"""

from __future__ import annotations

import contextlib
import os

import torch

VARIABLE = "MONTA_WGRAD_STREAM"
CHOICES = ("0", "1")

_side_streams: dict = {}


def enabled(t: torch.Tensor) -> bool:
    """Whether backward GEMMs on ``t``'s device put weight gradients on the side stream."""
    asked = os.environ.get(VARIABLE, "1")
    if asked not in CHOICES:
        raise ValueError(f"{VARIABLE} must be one of {', '.join(CHOICES)}, got {asked!r}")
    return asked == "1" and t.is_cuda


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


class WgradOverlap:
    """A fork of the current stream into a side stream for weight gradients (see module doc);
    every method is a no-op where :func:`enabled` is false."""

    def __init__(self, t: torch.Tensor):
        self.on = enabled(t)
        if self.on:
            self.main = torch.cuda.current_stream(t.device)
            self.other = _side_stream(t.device)
            self.fork()

    def fork(self) -> None:
        """The side stream waits for all work queued so far on the current stream."""
        if self.on:
            self.other.wait_stream(self.main)

    def side(self):
        """Context in which launches go to the side stream."""
        return torch.cuda.stream(self.other) if self.on else contextlib.nullcontext()

    def join(self, *made_on_side) -> None:
        """The current stream waits for the side stream; tensors allocated on the side stream
        (``made_on_side``, None allowed) are marked as used on the current one, so the caching
        allocator does not reuse their memory while it still reads them."""
        if not self.on:
            return
        self.main.wait_stream(self.other)
        for t in made_on_side:
            if t is not None:
                t.record_stream(self.main)
