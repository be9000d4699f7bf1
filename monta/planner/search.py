"""Enumerate strategies (TP, PP, EP, ETP, dispatcher, node dedup, chunks, recompute), drop the
ones that cannot run or do not fit in memory, rank the rest by predicted step time."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from monta.planner.costmodel import PlanContext, candidate_problems, evaluate
from monta.planner.explain import explain
from monta.planner.plan import Candidate, Plan
from monta.planner.recompute import parse_recompute

logger = logging.getLogger(__name__)
# at equal predicted time, the plan that recomputes less (selective reruns only elementwise
# work the model does not time, e.g. layernorm, moe_act)
RECOMPUTE_ORDER = {"none": 0, "selective": 1, "full": 2}


@dataclass(frozen=True)
class SearchSpace:
    """What to try; ``None`` for a degree means every value that can be valid."""

    tp: tuple[int, ...] | None = None
    """TP sizes (inside a node)."""
    pp: tuple[int, ...] | None = None
    """PP sizes."""
    ep: tuple[int, ...] | None = None
    """EP sizes."""
    etp: tuple[int, ...] | None = None
    """Expert-TP sizes (inside a node)."""
    dispatchers: tuple[str, ...] = ("alltoall", "ds_tp", "monta")
    """Dispatchers; ds_tp only with TP > 1 (with TP 1 it is monta without dedup)."""
    node_dedup: tuple[bool, ...] = (False, True)
    """monta node dedup off / on (on only where an EP group spans nodes and top-k > 1)."""
    chunks: tuple[int, ...] = (1, 2, 4, 8)
    """--monta-chunks values."""
    recompute: tuple[str, ...] = ("none",)
    """``none``, ``full`` and/or ``selective:<modules>`` (:func:`monta.planner.recompute.selective`;
    what pretrain_moe.py runs: :func:`monta.planner.auto.supported_recompute`)."""
    check_memory: bool = True
    """Drop plans that exceed device memory × headroom."""

    def __post_init__(self):
        for name in ("tp", "pp", "ep", "etp"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise ValueError(f"search space {name} must hold sizes >= 1, got {values}")
        unknown = set(self.dispatchers) - {"alltoall", "ds_tp", "monta"}
        if unknown:
            raise ValueError(f"unknown dispatchers {sorted(unknown)}; known: alltoall, ds_tp, "
                             f"monta")
        if not self.chunks or min(self.chunks) < 1:
            raise ValueError(f"chunks must be >= 1, got {self.chunks}")
        for option in self.recompute:
            parse_recompute(option)


@dataclass(frozen=True)
class SearchResult:
    """Ranked plans and what was dropped."""

    ranked: tuple[Plan, ...]
    """Fitting plans, fastest first (the first carries the *why*)."""
    over_memory: tuple[Plan, ...]
    """Plans that would run but exceed memory, fastest first."""
    rejected: dict = field(default_factory=dict)
    """Reason → number of candidates that cannot run."""
    evaluated: int = 0

    @property
    def best(self) -> Plan | None:
        return self.ranked[0] if self.ranked else None

    def all_plans(self) -> tuple[Plan, ...]:
        return self.ranked + self.over_memory


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(ctx: PlanContext, space: SearchSpace) -> list[Candidate]:
    """Every combination the space allows (validity is checked later)."""
    cl, model = ctx.cluster, ctx.model
    w, g = cl.world_size, cl.ranks_per_node
    tps = space.tp or [d for d in _divisors(g)]
    pps = space.pp or [d for d in _divisors(model.num_layers) if w % d == 0]
    eps = space.ep or [d for d in _divisors(model.num_experts) if d <= w]
    etps = space.etp or [d for d in _divisors(g)]
    out = []
    for tp in tps:
        for pp in pps:
            for ep in eps:
                for etp in etps:
                    for rc in space.recompute:
                        out += _dispatch_variants(Candidate(tp, pp, ep, etp, "alltoall",
                                                            recompute=rc), ctx, space)
    return out


def _dispatch_variants(base: Candidate, ctx: PlanContext, space: SearchSpace) -> list[Candidate]:
    def like(**kw):
        return Candidate(base.tp, base.pp, base.ep, base.etp, recompute=base.recompute, **kw)

    out = []
    if "alltoall" in space.dispatchers:
        out.append(like(dispatcher="alltoall"))
    if "ds_tp" in space.dispatchers and base.tp > 1:
        out.append(like(dispatcher="ds_tp"))
    if "monta" in space.dispatchers:
        for dedup in space.node_dedup:
            if dedup and ctx.model.topk < 2:
                continue  # one expert per token: dedup sends exactly what flat sends
            for chunks in space.chunks:
                out.append(like(dispatcher="monta", node_dedup=dedup, chunks=chunks))
    return out


def search(ctx: PlanContext, space: SearchSpace = SearchSpace(), explain_best: bool = True,
           ) -> SearchResult:
    """Evaluate every valid candidate; rank by step time (ties: less recompute, fewer chunks,
    smaller TP)."""
    fits, over, rejected = [], [], Counter()
    evaluated = 0
    for cand in candidates(ctx, space):
        problems = candidate_problems(cand, ctx)
        if problems:
            rejected[problems[0].split(" got ")[0]] += 1
            continue
        plan = evaluate(cand, ctx)
        evaluated += 1
        (fits if plan.memory.fits or not space.check_memory else over).append(plan)
    key = lambda p: (round(p.step_time_s, 12),  # noqa: E731
                     RECOMPUTE_ORDER[p.candidate.recompute_granularity], p.candidate.chunks,
                     p.candidate.tp, p.candidate.pp, str(p.candidate))
    fits.sort(key=key)
    over.sort(key=key)
    result = SearchResult(tuple(fits), tuple(over), dict(rejected), evaluated)
    if explain_best and fits:
        best = fits[0].with_why(explain(fits[0], result, ctx))
        result = SearchResult((best,) + tuple(fits[1:]), tuple(over), dict(rejected), evaluated)
    logger.debug("planner: %d candidates evaluated, %d fit, %d over memory, rejected %s",
                 evaluated, len(fits), len(over), dict(rejected))
    return result


def plan_for(ctx: PlanContext, space: SearchSpace = SearchSpace()) -> Plan:
    """The best plan, or a ValueError saying why none fits."""
    result = search(ctx, space)
    if result.best is None:
        if result.over_memory:
            closest = min(result.over_memory, key=lambda p: p.memory.total_GB)
            raise ValueError(
                f"no strategy fits in {ctx.cluster.device.memory_GB} GB per rank "
                f"(× headroom {ctx.cluster.device.memory_headroom}); the leanest, "
                f"{closest.candidate}, needs {closest.memory.total_GB:.1f} GB")
        raise ValueError(f"no valid strategy for world {ctx.cluster.world_size}: "
                         f"{result.rejected}")
    return result.best
