"""The plain-language *why* of a pick: what dominates, and what each choice buys against the
best alternative that differs in that choice only (all numbers from the cost model)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from monta.planner.plan import Candidate, Plan

if TYPE_CHECKING:  # pragma: no cover
    from monta.planner.costmodel import PlanContext
    from monta.planner.search import SearchResult

_COMM = {"ep/inter": "inter-node dispatch/combine", "ep/intra": "intra-node EP phases",
         "tp/collectives": "TP/SP collectives", "dp/grad_sync": "gradient sync",
         "pp/p2p": "pipeline sends", "pp/bubble": "the pipeline bubble",
         "ep/overhead": "per-chunk and per-hop overhead"}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _pct(new: float, old: float) -> str:
    return f"{(old - new) / old * 100:.0f} %" if old > 0 else "n/a"


def _lookup(result: "SearchResult") -> dict[Candidate, Plan]:
    return {p.candidate: p for p in result.all_plans()}


def _variant(plans: dict[Candidate, Plan], base: Candidate, **changes) -> Plan | None:
    try:
        return plans.get(dataclasses.replace(base, **changes))
    except ValueError:
        return None


def _best_with(plans: dict[Candidate, Plan], base: Candidate, **same) -> Plan | None:
    """Fastest plan sharing ``base``'s layout and recompute with the given fields."""
    pool = [p for c, p in plans.items()
            if (c.tp, c.pp, c.ep, c.etp, c.recompute) == (base.tp, base.pp, base.ep, base.etp,
                                                          base.recompute)
            and all(getattr(c, k) == v for k, v in same.items())]
    return min(pool, key=lambda p: p.step_time_s) if pool else None


def explain(best: Plan, result: "SearchResult", ctx: "PlanContext") -> tuple[str, ...]:
    """Sentences for ``best`` (the first says what dominates)."""
    plans = _lookup(result)
    c = best.candidate
    secs = best.seconds()
    compute = sum(v for k, v in secs.items() if k.startswith("compute/"))
    comm = {k: v for k, v in secs.items() if not k.startswith("compute/")}
    top_comm = max(comm, key=comm.get)
    share = lambda v: f"{v / best.step_time_s * 100:.0f} %"  # noqa: E731
    lines = []
    if top_comm in ("pp/bubble", "ep/overhead"):
        head = (f"compute is {share(compute)} of the step; the largest other cost is "
                f"{_COMM[top_comm]} ({_ms(comm[top_comm])}, {share(comm[top_comm])})")
    else:
        head = (f"{_COMM[top_comm]} is the largest exposed communication "
                f"({_ms(comm[top_comm])}, {share(comm[top_comm])} of the step; compute "
                f"{share(compute)})")
        if top_comm == "ep/inter":
            head = (f"inter-node dispatch/combine dominates the communication "
                    f"({_ms(comm[top_comm])}, {share(comm[top_comm])} of the step)")
    parts = []
    # 1) node dedup
    if c.dispatcher == "monta" and c.node_dedup:
        flat = _variant(plans, c, node_dedup=False)
        if flat and best.link_bytes()["inter"] > 0:
            ratio = flat.phase("ep/inter").inter_bytes / max(best.phase("ep/inter").inter_bytes,
                                                             1e-9)
            parts.append(f"node dedup cuts its bytes {ratio:.1f}× (top-{ctx.model.topk}: one "
                         f"copy per remote node, not per expert owner)")
    # 2) chunks
    if c.dispatcher == "monta" and c.chunks > 1:
        one = _variant(plans, c, chunks=1)
        if one:
            hidden = [(one.phase(n).seconds - best.phase(n).seconds, what) for n, what in
                      (("ep/intra", "the intra-node phases (ETP all-gather / fan-out)"),
                       ("ep/inter", "the inter-node all-to-all"))]
            hidden = [f"{_ms(s)} of {what}" for s, what in hidden if s > 0]
            if hidden:
                parts.append(f"{c.chunks} chunks hide {' and '.join(hidden)} behind the other "
                             f"phases and the experts (step "
                             f"{_pct(best.step_time_s, one.step_time_s)} shorter than 1 chunk)")
    lines.append(head + (": " + "; ".join(parts) if parts else ""))
    # 3) against the other dispatchers at the same layout
    for other in ("ds_tp", "alltoall"):
        if other == c.dispatcher:
            continue
        alt = _best_with(plans, c, dispatcher=other)
        if alt is None:
            continue
        lines.append(f"vs {other} at the same layout: EP communication "
                     f"{alt.ep_comm_seconds() / max(best.ep_comm_seconds(), 1e-12):.1f}× "
                     f"faster ({_ms(alt.ep_comm_seconds())} → {_ms(best.ep_comm_seconds())}), "
                     f"step {_pct(best.step_time_s, alt.step_time_s)} shorter"
                     + (f" (ds_tp with ETP1 also repeats each expert GEMM on all {c.tp} TP "
                        f"ranks)" if other == "ds_tp" and c.etp == 1 else ""))
    if c.dispatcher != "monta":
        alt = _best_with(plans, c, dispatcher="monta")
        if alt is not None:
            lines.append(f"monta at this layout ({alt.candidate.dispatch_label}) would take "
                         f"{_ms(alt.step_time_s)}: its extra stages do not pay here")
    # 4) layout: the runner-up with a different layout, and what memory excluded
    other = next((p for p in result.ranked[1:] if (p.candidate.tp, p.candidate.pp,
                  p.candidate.ep, p.candidate.etp) != (c.tp, c.pp, c.ep, c.etp)), None)
    if other:
        lines.append(f"best other layout {other.candidate.layout_label} "
                     f"({other.candidate.dispatch_label}) is "
                     f"{(other.step_time_s / best.step_time_s - 1) * 100:.0f} % slower")
    faster = [p for p in result.over_memory if p.step_time_s < best.step_time_s]
    if faster:
        f = faster[0]
        lines.append(f"{f.candidate} would be {_pct(f.step_time_s, best.step_time_s)} faster "
                     f"but needs {f.memory.total_GB:.0f} GB/rank > {f.memory.capacity_GB:.0f} GB")
    if c.pp > 1:
        lines.append(f"PP{c.pp} with {best.micro_batches} micro-batches: bubble "
                     f"{share(secs['pp/bubble'])} of the step")
    return tuple(lines)
