"""Timing for the GPU benchmarks: CUDA-event medians, one call at a time or back to back,
variants in interleaved rounds (so clock and thermal drift favour none), and the environment
switches (``MONTA_GROUPED_GEMM`` and others) a variant runs under. Used by ``bench/gpu_moe.py``
and the other ``bench/gpu_*.py`` scripts.
"""

from __future__ import annotations

import os
import statistics
import time

import torch


class Timer:
    """Median wall time of ``fn`` on this device (CUDA events; host clock on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def settle(self, iters: int = 200):
        """The same ~150 ms of dense bf16 GEMMs (on an H200) before each variant's samples, so
        every variant starts from the same sustained load. An H200 ran the same expert FFN
        16 % faster in a variant that followed a mostly idle one (its clock had risen; every
        kernel of the FFN ran that much faster): 4.4–4.7 against 5.1–5.2 ms in three runs
        (bench/results/gpu_moe_runs/gpu_moe_{77a0c28,93223d4,74c16a8}.json, fine-grained
        ``grouped`` and ``grouped_only``), and ~17 ms of load in between did not even it out."""
        if not self.cuda:
            return
        if getattr(self, "_settle_operands", None) is None:
            gen = torch.Generator(device="cuda").manual_seed(0)
            self._settle_operands = [torch.randn(n, 8192, device="cuda", generator=gen)
                                     .bfloat16() for n in (8192, 4096)]
        a, b = self._settle_operands
        for _ in range(iters):
            a @ b.t()
        torch.cuda.synchronize()

    def __call__(self, fn, warmup: int = 3, reps: int = 10, setup=None, chain: int = 1) -> dict:
        """``chain`` > 1: each sample is ``chain`` calls back to back (``setup`` before each,
        no sync in between) divided by ``chain``, as in a training loop, where the host queues
        the next call while the GPU runs this one; 1: one call between two syncs, so the
        host's launch latency before the first kernel is on the clock."""
        for _ in range(warmup):
            if setup:
                setup()
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if setup and chain == 1:
                setup()
            self.sync()
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                self._calls(fn, setup, chain)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / chain)
            else:
                t0 = time.perf_counter()
                self._calls(fn, setup, chain)
                times.append((time.perf_counter() - t0) * 1e3 / chain)
        return {"median_ms": statistics.median(times), "min_ms": min(times),
                "max_ms": max(times), "reps": reps, "samples_ms": times}

    @staticmethod
    def _calls(fn, setup, chain: int):
        if chain == 1:
            fn()
            return
        for _ in range(chain):
            if setup:
                setup()
            fn()


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def rotated(items: list, round_: int, rounds: int = 0) -> list:
    """``items`` in the order of interleaved round ``round_`` of ``rounds``: shifted by
    ``round_`` times a stride of ``len(items) // rounds`` (at least 1), so that no item always
    runs first (after the warm-up) or last, and with fewer rounds than items each item's places
    spread over the whole round. A shift of one per round would give the first ``rounds`` items
    the first place once and the last places in every other round, and never put the rest
    late. (In bench/gpu_moe.py's fine-grained FFN, 12 variants in 6 rounds, the first-listed
    variant ran 2–5 % slower than an identical twin in the three runs before the stride
    (53fd0bd, 3db4cfd, 70d4f64) but 1–2 % faster in two earlier ones (fdff208, 792025a); with
    the stride, identical twins still differed by up to 3 % in the next run (305f7b3), so
    place was at most part of it: bench/results/gpu_moe_runs/.)"""
    stride = max(len(items) // rounds, 1) if rounds else 1
    shift = round_ * stride % max(len(items), 1)
    return items[shift:] + items[:shift]


def time_interleaved(variants: dict, timer: Timer, rounds: int, reps: int, setup=None,
                     catch: bool = False, chain: int = 1) -> tuple[dict, dict]:
    """``variants`` {name: (MONTA_GROUPED_GEMM pin, fn)}, each timed ``reps`` samples (of
    ``chain`` calls back to back, see :class:`Timer`) per round in ``rounds`` interleaved rounds
    in :func:`rotated` order (3 warm-up calls the first time, 1 after), each after
    :meth:`Timer.settle`, so clock and thermal drift favour none. Returns ({name: samples in ms}, {name: error}); with ``catch`` a variant
    that raises is recorded and left out of later rounds, else the error propagates."""
    samples, errors = {name: [] for name in variants}, {}
    for round_ in range(rounds):
        for name, (pin, fn) in rotated(list(variants.items()), round_, rounds):
            if name in errors:
                continue
            try:
                timer.settle()
                t = with_grouped_gemm(pin, lambda: timer(fn, warmup=3 if round_ == 0 else 1,
                                                         reps=reps, setup=setup, chain=chain))
            except Exception as error:
                if not catch:
                    raise
                errors[name] = f"{type(error).__name__}: {str(error)[:200]}"
                continue
            samples[name] += t["samples_ms"]
    return samples, errors


def with_grouped_gemm(pin: str, fn):
    """``fn()`` under ``MONTA_GROUPED_GEMM=pin`` (monta/expert_gemm.py: ``default``, ``torch``,
    ``sm90:<config>``, ``auto``: each grouped GEMM on the kernel measured fastest for it...)."""
    return with_env("MONTA_GROUPED_GEMM", pin, fn)


def with_env(name: str, value: str, fn):
    """``fn()`` with the environment variable ``name`` set to ``value``."""
    return with_envs({name: value}, fn)


def with_envs(env: dict, fn):
    """``fn()`` with each environment variable of ``env`` set to its value, restored after."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
