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
   timing noise). They take turns, one forward each, for :data:`TRIALS` rounds (every
   candidate computes the same function, only summation order differs, so training goes on
   meanwhile); round-robin rather than back-to-back so a burst of host noise hits one trial of
   several candidates, not every trial of one;
2) a trial is timed over the layer's forward *and* backward (from the output's gradient
   arriving to the input's gradient leaving): a chunked pipeline can win the forward and lose
   the backward, and the forward alone picked such options on the testbed. A candidate's time
   is its fastest trial (the first one pays warm-up, noise only adds);
3) the ranks that exchange this layer's tokens (EP × expert-TP) must agree, so at the first
   forward after the last trial they take the max over ranks of each time (one small
   all-reduce, the only collective the tuner adds) and all pick the same minimum — or
   ``stock`` when the minimum is not :data:`STOCK_MARGIN` faster than it. Where a
   trial's backward has not run by then (forward-only use, or pipeline schedules that run
   several forwards first), every candidate is compared on its forward time instead;
4) a MoNTA option picked over ``stock`` is provisional: :data:`CONFIRM_ROUNDS` more passes of
   each, alternating, must still time it no slower than ``stock`` (same max over ranks), or
   ``stock`` is kept. On the testbed at 4 Gbit/s a pick made in the trials once ran at 0.87× of
   stock afterwards (TP1·EP4 top-2, ``bench/results/moe_ab_4gbit.md``): the trials' fastest of
   several candidates is biased towards whichever got lucky, and fresh head-to-head samples
   are not.

On GPU the timed passes synchronise the device (only while tuning). Runs that tune are not
bit-reproducible across jobs (the choice depends on timing); fix the flags for that.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

CHUNK_OPTIONS = (1, 2, 4, 8)
TRIALS = 3
STOCK_MARGIN = 0.05
"""A MoNTA option replaces megatron's path only when it measured at least this much faster:
on the 2-core testbed two layers running the *same* stock code time up to ~10 % apart, so a
smaller win is as likely noise as real, and stock is the safe side of a tie."""
CONFIRM_ROUNDS = 2
"""Head-to-head passes of each (the pick, then stock) that confirm a pick over stock (step 4)."""


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
    trials: int = TRIALS
    forward_s: dict[Setting, float] = field(default_factory=dict)
    """Fastest forward per candidate."""
    step_s: dict[Setting, float] = field(default_factory=dict)
    """Fastest forward + backward per candidate."""
    runs: int = 0
    chosen: Setting | None = None
    times: dict[Setting, float] = field(default_factory=dict)
    """After the choice: the times it compared (max over ranks), on :attr:`basis`."""
    basis: str = "forward + backward"
    clock: Callable[[], float] = time.perf_counter
    confirm_rounds: int = CONFIRM_ROUNDS
    provisional: Setting | None = None
    """The trials' pick over stock, while it is being confirmed head to head."""
    confirm_runs: int = 0
    confirm_forward_s: dict[Setting, float] = field(default_factory=dict)
    confirm_step_s: dict[Setting, float] = field(default_factory=dict)
    confirmation: tuple[float, float] | None = None
    """(pick, stock) times the confirmation compared (max over ranks)."""

    @staticmethod
    def for_options(dedup_options: list[bool], chunk_options: list[int], group,
                    trials: int = TRIALS, with_stock: bool = False) -> "DispatchTuner":
        candidates = [Setting(d, c) for d in dedup_options for c in chunk_options]
        if with_stock:
            candidates.append(STOCK)
        return DispatchTuner(candidates, group, trials,
                             chosen=candidates[0] if len(candidates) == 1 else None)

    def setting(self) -> Setting:
        if self.chosen is not None:
            return self.chosen
        if self.provisional is not None:
            return (STOCK, self.provisional)[self.confirm_runs % 2]
        return self.candidates[self.runs % len(self.candidates)]

    def timed_forward(self, forward, device: torch.device, inputs: torch.Tensor | None = None):
        """Run ``forward()`` under the current setting; while tuning, time it and (when
        ``inputs`` and the output take part in autograd) its backward."""
        if self.chosen is None:
            if self.provisional is None and self.runs >= len(self.candidates) * self.trials:
                self._decide(device)
            elif self.provisional is not None and self.confirm_runs >= 2 * self.confirm_rounds:
                self._confirm(device)
        if self.chosen is not None:
            return forward()
        setting = self.setting()
        _sync(device)
        start = self.clock()
        out = forward()
        _sync(device)
        seconds = self.clock() - start
        if self.provisional is None:
            self.runs += 1
            forward_table, step_table = self.forward_s, self.step_s
        else:
            self.confirm_runs += 1
            forward_table, step_table = self.confirm_forward_s, self.confirm_step_s
        _keep_min(forward_table, setting, seconds)
        output = out[0] if isinstance(out, tuple) else out
        if inputs is not None and inputs.requires_grad and output.requires_grad:
            self._time_backward(step_table, setting, seconds, output, inputs, device)
        return out

    def _time_backward(self, table: dict, setting: Setting, forward_s: float,
                       output: torch.Tensor, inputs: torch.Tensor, device: torch.device) -> None:
        began: list[float] = []

        def output_grad_arrived(grad):
            _sync(device)
            began.append(self.clock())

        def input_grad_done(grad):
            if began:
                _sync(device)
                _keep_min(table, setting, forward_s + self.clock() - began[0])

        output.register_hook(output_grad_arrived)
        inputs.register_hook(input_grad_done)

    def _slowest_over_ranks(self, settings, forward_s: dict, step_s: dict, device):
        """Per setting, the max over the group's ranks of its step time, or of its forward time
        when some rank lacks a step time for any of them; and which basis that is."""
        n = len(settings)
        times = torch.tensor([forward_s[c] for c in settings]
                             + [step_s.get(c, math.inf) for c in settings],
                             dtype=torch.float64, device=device)
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            # inf after the max: some rank has no backward time for that candidate
            dist.all_reduce(times, op=dist.ReduceOp.MAX, group=self.group)
        slowest = times.tolist()
        complete = all(math.isfinite(t) for t in slowest[n:])
        return (slowest[n:] if complete else slowest[:n],
                "forward + backward" if complete else "forward")

    def _decide(self, device: torch.device) -> None:
        compared, self.basis = self._slowest_over_ranks(self.candidates, self.forward_s,
                                                        self.step_s, device)
        best = min(range(len(self.candidates)), key=lambda i: (compared[i], i))
        self.times = dict(zip(self.candidates, compared))
        if STOCK in self.candidates:
            stock = self.candidates.index(STOCK)
            if compared[best] > (1 - STOCK_MARGIN) * compared[stock]:
                best = stock
            elif self.confirm_rounds > 0:
                self.provisional = self.candidates[best]
                return
        self.chosen = self.candidates[best]

    def _confirm(self, device: torch.device) -> None:
        pick = self.provisional
        (pick_s, stock_s), _ = self._slowest_over_ranks([pick, STOCK], self.confirm_forward_s,
                                                        self.confirm_step_s, device)
        self.confirmation = (pick_s, stock_s)
        self.chosen = pick if pick_s <= stock_s else STOCK

    def report(self) -> str:
        ranked = sorted(self.times.items(), key=lambda kv: kv[1])
        text = (f"{self.chosen} ({self.basis} ms, max over ranks: "
                + ", ".join(f"{s} {t * 1e3:.1f}" for s, t in ranked) + ")")
        if self.confirmation is not None:
            pick_s, stock_s = self.confirmation
            text += (f"; {self.provisional} {'confirmed' if self.chosen != STOCK else 'rejected'}"
                     f" head to head: {pick_s * 1e3:.1f} vs stock {stock_s * 1e3:.1f} ms")
        return text


def _keep_min(table: dict, key, seconds: float) -> None:
    table[key] = min(seconds, table.get(key, math.inf))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
