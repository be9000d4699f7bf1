"""``tune``: the MoNTA dispatcher measures its options on the real network and keeps the fastest.

Whether node de-duplication pays depends on how much slower the inter-node link is than the
intra-node one (the fan-out adds an intra-node hop); whether chunking pays depends on the fixed
cost per collective against the transfer time it hides. Both vary with the cluster, the layer
and top-k, and a wrong guess costs more than the feature saves (on a fast link at top-1 the flat,
single-chunk path wins). So, as Tutel does for its parallel modes, ``--monta-node-dedup tune``
and/or ``--monta-chunks tune`` time each candidate for a few forwards of the layer and keep the
fastest:

1) candidates are the (dedup, chunks) pairs left open by the flags — dedup only where the EP
   group spans nodes and top-k > 1, chunks from :data:`CHUNK_OPTIONS` — plus megatron's own
   ``alltoall`` path (``stock``: permute + one flat all-to-all, no send plans; on a fast link at
   top-1 its lower fixed cost wins, so ``tune`` is never slower than stock by more than the
   timing noise), run in a fixed order, ``trials`` forwards each (every candidate computes the
   same function, only summation order differs, so training goes on meanwhile);
2) a candidate's time is its fastest trial (the first one pays warm-up, noise only adds);
3) the ranks that exchange this layer's tokens (EP × expert-TP) must agree, so once every
   candidate ran they take the max over ranks of each time (one small all-reduce, the only
   collective the tuner adds) and all pick the same minimum.

Forward time stands for forward + backward: backward runs the mirrored collectives and twice the
expert work through the same pipeline. On GPU the timed forwards synchronise the device (only
while tuning). Runs that tune are not bit-reproducible across jobs (the choice depends on
timing); fix the flags for that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

CHUNK_OPTIONS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Setting:
    node_dedup: bool
    chunks: int
    stock: bool = False
    """megatron-core's ``alltoall`` dispatcher instead of MoNTA's (then flat, one chunk)."""

    def __str__(self) -> str:
        if self.stock:
            return "stock"
        return f"{'dedup' if self.node_dedup else 'flat'}/c{self.chunks}"


STOCK = Setting(node_dedup=False, chunks=1, stock=True)


@dataclass
class DispatchTuner:
    """Per-layer trial state; ``setting()`` says what the next forward runs."""

    candidates: list[Setting]
    group: object
    """Process group whose members must agree (EP × expert-TP)."""
    trials: int = 2
    times: dict[Setting, float] = field(default_factory=dict)
    runs: int = 0
    chosen: Setting | None = None
    clock: Callable[[], float] = time.perf_counter

    @staticmethod
    def for_options(dedup_options: list[bool], chunk_options: list[int], group,
                    trials: int = 2, with_stock: bool = False) -> "DispatchTuner":
        candidates = [Setting(d, c) for d in dedup_options for c in chunk_options]
        if with_stock:
            candidates.append(STOCK)
        return DispatchTuner(candidates, group, trials,
                             chosen=candidates[0] if len(candidates) == 1 else None)

    def setting(self) -> Setting:
        if self.chosen is not None:
            return self.chosen
        return self.candidates[self.runs // self.trials]

    def timed_forward(self, forward, device: torch.device):
        """Run ``forward()`` under the current setting; time it while tuning."""
        if self.chosen is not None:
            return forward()
        setting = self.setting()
        _sync(device)
        start = self.clock()
        out = forward()
        _sync(device)
        seconds = self.clock() - start
        self.times[setting] = min(seconds, self.times.get(setting, float("inf")))
        self.runs += 1
        if self.runs == len(self.candidates) * self.trials:
            self._decide(device)
        return out

    def _decide(self, device: torch.device) -> None:
        times = torch.tensor([self.times[c] for c in self.candidates], dtype=torch.float64,
                             device=device)
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(times, op=dist.ReduceOp.MAX, group=self.group)
        slowest_first = times.tolist()
        best = min(range(len(self.candidates)), key=lambda i: (slowest_first[i], i))
        self.chosen = self.candidates[best]
        self.times = dict(zip(self.candidates, slowest_first))

    def report(self) -> str:
        ranked = sorted(self.times.items(), key=lambda kv: kv[1])
        return (f"{self.chosen} (forward ms, max over ranks: "
                + ", ".join(f"{s} {t * 1e3:.1f}" for s, t in ranked) + ")")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
