"""Optional ``torch.profiler`` window over training iterations, for diagnosis.

``MONTA_PROFILE_STEPS=a:b`` profiles iterations a..b-1 (1-based, as logged) on the reporting
rank and prints a summary after iteration b-1; ``MONTA_PROFILE_OUT=path.json`` also writes it
as JSON (``bench/gpu_moe.py`` reads it). The summary says whether the GPU was kept busy (kernel
time over wall time: far below 1 means the host, not the GPU, sets the pace), the kernels that
took the time, and the host operations that did. Profiled iterations run slower; leave them out
of throughput numbers.
"""

from __future__ import annotations

import json
import os
import time

import torch


def _self_device_us(event) -> float:
    return (getattr(event, "self_device_time_total", None)
            or getattr(event, "self_cuda_time_total", 0) or 0)


class StepProfiler:
    """Call :meth:`step_started` / :meth:`step_finished` around every iteration."""

    def __init__(self, enabled: bool, spec: str | None = None, out: str | None = None):
        spec = os.environ.get("MONTA_PROFILE_STEPS") if spec is None else spec
        self.out = os.environ.get("MONTA_PROFILE_OUT") if out is None else out
        self.window = None
        if enabled and spec:
            start, stop = (int(v) for v in spec.split(":"))
            if stop <= start:
                raise ValueError(f"MONTA_PROFILE_STEPS={spec}: want start:stop with stop > start")
            self.window = (start, stop)
        self.profiler = None
        self.started = 0.0

    def step_started(self, iteration: int) -> None:
        if self.window is None or iteration != self.window[0]:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        self.started = time.perf_counter()

    def step_finished(self, iteration: int) -> dict | None:
        if self.profiler is None or iteration != self.window[1] - 1:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        summary = self.summarize(self.profiler, wall, self.window[1] - self.window[0])
        self.profiler = None
        print(json.dumps({"profile": summary}, indent=1), flush=True)
        if self.out:
            with open(self.out, "w") as f:
                json.dump(summary, f, indent=1)
        return summary

    @staticmethod
    def summarize(prof, wall_s: float, steps: int, top: int = 15) -> dict:
        events = prof.key_averages()
        kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
                   and _self_device_us(e) > 0]
        kernel_us = sum(_self_device_us(e) for e in kernels)
        host = [e for e in events if not str(getattr(e, "device_type", "")).endswith("CUDA")]
        return {
            "steps": steps,
            "wall_ms_per_step": wall_s * 1e3 / steps,
            "gpu_kernel_ms_per_step": kernel_us / 1e3 / steps,
            "gpu_busy_fraction": kernel_us / 1e6 / wall_s if wall_s else None,
            "kernel_launches_per_step": sum(e.count for e in kernels) / steps,
            "top_kernels": [{"kernel": e.key[:110], "ms_per_step": _self_device_us(e) / 1e3 / steps,
                             "share": _self_device_us(e) / kernel_us if kernel_us else None,
                             "calls_per_step": e.count / steps}
                            for e in sorted(kernels, key=_self_device_us, reverse=True)[:top]],
            "top_host_ops": [{"op": e.key[:80], "self_cpu_ms_per_step": e.self_cpu_time_total
                              / 1e3 / steps, "calls_per_step": e.count / steps}
                             for e in sorted(host, key=lambda e: e.self_cpu_time_total,
                                             reverse=True)[:top]],
        }
