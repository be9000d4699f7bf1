"""A profiler window over training iterations, for diagnosis.

Megatron-LM's flags pick it: ``--profile`` with ``--use-pytorch-profiler`` runs
``torch.profiler`` (shapes and Python stacks recorded) over the iterations after
``--profile-step-start`` up to ``--profile-step-end`` on ``--profile-ranks``, writes the trace
under ``--tensorboard-dir`` (``rank<N>.*.pt.trace.json``: TensorBoard's profiler plugin, or
Perfetto) and logs a summary; ``--profile`` alone brackets the same iterations with
``cudaProfilerStart``/``Stop`` and NVTX ranges per operator, for ``nsys profile
--capture-range=cudaProfilerApi``.

Without the flags, ``MONTA_PROFILE_STEPS=a:b`` profiles iterations a..b-1 (1-based, as logged)
on the reporting rank, without stacks, and ``MONTA_PROFILE_OUT=path.json`` also writes the
summary as JSON (``bench/gpu_moe.py`` reads it). The summary says whether the GPU was kept busy
(kernel time over wall time: far below 1 means the host, not the GPU, sets the pace), the
kernels that took the time, and the host operations that did. Profiled iterations run slower;
leave them out of throughput numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch

TORCH, NSYS = "torch", "nsys"
# what with_stack adds as events: "path.py(line): function", "<built-in ...>"
_PYTHON_FRAME = re.compile(r"^<built-in |^<stdin>|.*\.py\(\d+\): ")


def busy_us(spans) -> float:
    """Time covered by at least one of the ``(start, end)`` spans: the GPU's busy time when
    kernels on several streams overlap (the experts' weight gradients, monta/wgrad_overlap.py),
    which a plain sum of their durations counts twice."""
    covered, reached = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reached:
            covered += end - max(start, reached)
            reached = end
    return covered


def device_spans(prof) -> list:
    """(start, end) in µs of every GPU operation a ``torch.profiler`` run recorded."""
    return [(e.time_range.start, e.time_range.end) for e in prof.events()
            if str(getattr(e, "device_type", "")).endswith("CUDA")]


def self_device_us(event) -> float:
    """A profiler event's own GPU time in µs (the field's name differs across torch versions)."""
    return (getattr(event, "self_device_time_total", None)
            or getattr(event, "self_cuda_time_total", 0) or 0)


class StepProfiler:
    """Call :meth:`step_started` before and :meth:`step_finished` after every iteration.

    ``window``: (first, last + 1) iterations as logged, or None (off); ``mode``: ``torch`` or
    ``nsys``; ``trace_dir``: where the torch trace goes (None: summary only); ``out``: the
    summary as JSON; ``stacks``: record shapes and Python stacks (slower, richer traces)."""

    def __init__(self, window: tuple[int, int] | None = None, mode: str = TORCH,
                 trace_dir: str | None = None, out: str | None = None, rank: int = 0,
                 stacks: bool = False):
        if window is not None and window[1] <= window[0]:
            raise ValueError(f"profiler window {window}: want (first, stop) with stop > first")
        self.window, self.mode, self.trace_dir, self.out = window, mode, trace_dir, out
        self.rank, self.stacks = rank, stacks
        self.profiler = None
        self.started = 0.0
        self.last_iteration = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, rank: int, reporting: bool) -> "StepProfiler":
        """From ``--profile`` and its flags on the ranks they name, else from
        ``MONTA_PROFILE_STEPS`` on the reporting rank, else off."""
        if args.profile:
            if rank not in args.profile_ranks:
                return cls()
            return cls((args.profile_step_start + 1, args.profile_step_end + 1),
                       TORCH if args.use_pytorch_profiler else NSYS,
                       trace_dir=args.tensorboard_dir, rank=rank, stacks=True)
        spec = os.environ.get("MONTA_PROFILE_STEPS")
        if not (reporting and spec):
            return cls()
        first, stop = (int(v) for v in spec.split(":"))
        if stop <= first:
            raise ValueError(f"MONTA_PROFILE_STEPS={spec}: want start:stop with stop > start")
        return cls((first, stop), TORCH, out=os.environ.get("MONTA_PROFILE_OUT"), rank=rank)

    def step_started(self, iteration: int) -> None:
        if self.window is None or iteration != self.window[0]:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self.mode == NSYS:
            torch.cuda.cudart().cudaProfilerStart()
            self.profiler = torch.autograd.profiler.emit_nvtx(record_shapes=True)
        else:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self.profiler = profile(activities=activities, record_shapes=self.stacks,
                                    with_stack=self.stacks)
        self.profiler.__enter__()
        self.started = time.perf_counter()

    def step_finished(self, iteration: int) -> dict | None:
        self.last_iteration = iteration
        if self.profiler is None or iteration != self.window[1] - 1:
            return None
        return self._finish(iteration)

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        """End a window that training left before its last iteration (--train-iters, an exit
        signal or --exit-interval came first): what was profiled is reported and written as
        usual."""
        if self.profiler is not None:
            self._finish(self.last_iteration)

    def _finish(self, iteration: int) -> dict | None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        profiler, self.profiler = self.profiler, None
        if self.mode == NSYS:
            torch.cuda.cudart().cudaProfilerStop()
            print(f"rank {self.rank}: profiled iterations {self.window[0]}..{iteration} for "
                  f"Nsight Systems (cudaProfilerStart/Stop)", flush=True)
            return None
        summary = {"rank": self.rank, "iterations": [self.window[0], iteration],
                   **self.summarize(profiler, wall, max(iteration - self.window[0] + 1, 1))}
        if self.trace_dir:
            os.makedirs(self.trace_dir, exist_ok=True)
            from torch.profiler import tensorboard_trace_handler

            tensorboard_trace_handler(self.trace_dir, worker_name=f"rank{self.rank}")(profiler)
            summary["trace_dir"] = self.trace_dir
        print(json.dumps({"profile": summary}, indent=1), flush=True)
        if self.out:
            with open(self.out, "w") as f:
                json.dump(summary, f, indent=1)
        return summary

    @staticmethod
    def summarize(prof, wall_s: float, steps: int, top: int = 15) -> dict:
        events = prof.key_averages()
        kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
                   and self_device_us(e) > 0]
        kernel_us = sum(self_device_us(e) for e in kernels)
        host = [e for e in events if not str(getattr(e, "device_type", "")).endswith("CUDA")
                and not _PYTHON_FRAME.match(e.key)]  # operators, not the stacks' frames
        return {
            "steps": steps,
            "wall_ms_per_step": wall_s * 1e3 / steps,
            "gpu_kernel_ms_per_step": kernel_us / 1e3 / steps,
            "gpu_busy_fraction": busy_us(device_spans(prof)) / 1e6 / wall_s if wall_s else None,
            "kernel_launches_per_step": sum(e.count for e in kernels) / steps,
            "top_kernels": [{"kernel": e.key[:110], "ms_per_step": self_device_us(e) / 1e3 / steps,
                             "share": self_device_us(e) / kernel_us if kernel_us else None,
                             "calls_per_step": e.count / steps}
                            for e in sorted(kernels, key=self_device_us, reverse=True)[:top]],
            "top_host_ops": [{"op": e.key[:80], "self_cpu_ms_per_step": e.self_cpu_time_total
                              / 1e3 / steps, "calls_per_step": e.count / steps}
                             for e in sorted(host, key=lambda e: e.self_cpu_time_total,
                                             reverse=True)[:top]],
        }
