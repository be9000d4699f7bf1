"""Test-only fault injection, so fault drills hit the exact moment they mean to.

Set ``MONTA_FAULT_INJECT`` to one or more ``kind@key=value,...`` items separated by ``;``::

    kill@rank=1,iter=3,phase=forward              rank 1 SIGKILLs itself entering the forward of
                                                  iteration 3
    kill@rank=2,iter=5,phase=dispatch,layer=2     ... entering MoE dispatch of layer 2
    kill@rank=3,iter=4,phase=save_commit          ... after writing its shards of the iteration-4
                                                  save, before the manifest and rename
    kill@rank=1,iter=5,phase=combine,signal=STOP  freeze instead (SIGSTOP: a vanished node)
    nan@iter=5,layer=1[,rank=2][,count=3]         NaN output of decoder layer 1 for iterations
                                                  5..7 (on rank 2 only, or on every rank)
    collapse@iter=2[,count=3][,layer=1]           every router sends all tokens to experts
                                                  0..k-1 (router collapse; with a capacity factor
                                                  also overflow, and ranks left without tokens)
    diskfull@iter=4[,rank=0]                      the save of iteration 4 fails with ENOSPC before
                                                  writing (when a size-limited tmpfs cannot be
                                                  mounted)

Phases are the keys of :data:`monta.training.watchdog.PHASE_KEYS`. Before acting, an injector
appends ``<unix time> <item>`` to ``MONTA_FAULT_LOG`` if set (drills measure time to detect from
it). Nothing here runs unless the variable is set: :func:`install` is then a no-op.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass

from monta.training.watchdog import PHASE, PHASE_KEYS

ENV = "MONTA_FAULT_INJECT"
LOG_ENV = "MONTA_FAULT_LOG"
_KINDS = ("kill", "nan", "collapse", "diskfull")
_SIGNALS = {"KILL": signal.SIGKILL, "STOP": signal.SIGSTOP, "TERM": signal.SIGTERM}


@dataclass(frozen=True)
class Fault:
    """One item of :data:`ENV`."""

    kind: str
    iteration: int
    """First iteration it acts on (1-based, as logged)."""
    count: int = 1
    """Consecutive iterations it acts on (nan, collapse)."""
    rank: int | None = None
    """Only this rank (None: every rank)."""
    phase: str | None = None
    """kill: the phase whose entry triggers it."""
    layer: int | None = None
    """1-based layer number (None: any layer)."""
    signal: str = "KILL"
    """kill: KILL, STOP or TERM."""

    def acts_at(self, iteration: int, rank: int, layer: int | None = None) -> bool:
        return (self.iteration <= iteration < self.iteration + self.count
                and (self.rank is None or self.rank == rank)
                and (self.layer is None or layer is None or self.layer == layer))

    def __str__(self) -> str:
        fields = {"rank": self.rank, "iter": self.iteration, "phase": self.phase,
                  "layer": self.layer, "count": self.count if self.count != 1 else None,
                  "signal": self.signal if self.signal != "KILL" else None}
        return self.kind + "@" + ",".join(f"{k}={v}" for k, v in fields.items() if v is not None)


def parse(spec: str) -> list[Fault]:
    """Parse :data:`ENV`'s value; a ValueError names the item and what is wrong."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        kind, _, body = item.partition("@")
        if kind not in _KINDS:
            raise ValueError(f"{ENV}: unknown fault kind {kind!r} in {item!r}; one of {_KINDS}")
        fields = {}
        for pair in filter(None, body.split(",")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"{ENV}: {pair!r} in {item!r} is not key=value")
            fields[key.strip()] = value.strip()
        unknown = set(fields) - {"rank", "iter", "phase", "layer", "count", "signal"}
        if unknown or "iter" not in fields:
            raise ValueError(f"{ENV}: {item!r} needs iter=N and knows rank, iter, phase, layer, "
                             f"count, signal (got {sorted(fields)})")
        as_int = {k: int(fields[k]) for k in ("rank", "iter", "layer", "count") if k in fields}
        fault = Fault(kind, as_int["iter"], as_int.get("count", 1), as_int.get("rank"),
                      fields.get("phase"), as_int.get("layer"), fields.get("signal", "KILL"))
        if kind == "kill" and (fault.rank is None or fault.phase not in PHASE_KEYS
                               or fault.signal not in _SIGNALS):
            raise ValueError(f"{ENV}: {item!r}: kill needs rank=R and phase= one of {PHASE_KEYS} "
                             f"(signal one of {tuple(_SIGNALS)})")
        if kind == "nan" and fault.layer is None:
            raise ValueError(f"{ENV}: {item!r}: nan needs layer=L (a decoder layer, 1-based)")
        faults.append(fault)
    return faults


def _log(fault: Fault, rank: int, iteration: int) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} {fault} rank={rank} pid={os.getpid()} "
                    f"at_iter={iteration}\n")


class FaultInjector:
    """Acts on the parsed faults of one rank; see the module docstring."""

    def __init__(self, faults: list[Fault], rank: int):
        self.faults, self.rank = faults, rank
        self._logged: set[tuple[Fault, int]] = set()

    def _fire(self, fault: Fault, iteration: int) -> None:
        if (fault, iteration) not in self._logged:
            self._logged.add((fault, iteration))
            _log(fault, self.rank, iteration)

    def on_phase(self, key: str, layer: int, iteration: int) -> None:
        for fault in self.faults:
            if (fault.kind == "kill" and fault.phase == key
                    and fault.acts_at(iteration, self.rank, layer or None)):
                self._fire(fault, iteration)
                os.kill(os.getpid(), _SIGNALS[fault.signal])

    def check_save(self, iteration: int) -> None:
        """Raise ENOSPC for a ``diskfull`` item at this save."""
        for fault in self.faults:
            if fault.kind == "diskfull" and fault.acts_at(iteration, self.rank):
                self._fire(fault, iteration)
                raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV}={fault})")

    def install(self, model_chunks) -> None:
        """Hook the phase marker and the model's decoder layers and routers."""
        if any(f.kind == "kill" for f in self.faults):
            PHASE.hook = self.on_phase
        kinds = {f.kind for f in self.faults}
        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                if "nan" in kinds and re.search(r"decoder\.layers\.\d+$", name):
                    module.register_forward_hook(self._nan_hook)
                if "collapse" in kinds and name.endswith("mlp.router"):
                    self._wrap_gating(module)

    def _nan_hook(self, layer, _inputs, outputs):
        for fault in self.faults:
            if fault.kind == "nan" and fault.acts_at(PHASE.iteration, self.rank,
                                                     layer.layer_number):
                self._fire(fault, PHASE.iteration)
                hidden, *rest = outputs if isinstance(outputs, tuple) else (outputs,)
                hidden = hidden + float("nan")
                return (hidden, *rest) if isinstance(outputs, tuple) else hidden
        return None

    def _wrap_gating(self, router) -> None:
        gating = router.gating

        def collapsed_gating(inputs):
            logits = gating(inputs)
            for fault in self.faults:
                if fault.kind == "collapse" and fault.acts_at(PHASE.iteration, self.rank,
                                                              router.layer_number):
                    self._fire(fault, PHASE.iteration)
                    # a large logit on experts 0..k-1: every token picks exactly those
                    bias = logits.new_zeros(logits.shape[-1])
                    bias[: router.topk] = 1e4
                    return logits + bias
            return logits

        router.gating = collapsed_gating


_ACTIVE: FaultInjector | None = None


def install(model_chunks, rank: int) -> FaultInjector | None:
    """Parse :data:`ENV` and install its faults; None (and nothing installed) when unset."""
    global _ACTIVE
    spec = os.environ.get(ENV)
    if not spec:
        return None
    _ACTIVE = FaultInjector(parse(spec), rank)
    _ACTIVE.install(model_chunks)
    return _ACTIVE


def check_save(iteration: int) -> None:
    """The save hook: raises an injected ENOSPC, or does nothing (the normal case)."""
    if _ACTIVE is not None:
        _ACTIVE.check_save(iteration)
