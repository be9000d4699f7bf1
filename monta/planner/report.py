"""Tables, JSON and a stacked-bar plot of ranked plans."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from monta.planner.costmodel import PlanContext
from monta.planner.plan import PHASES, Plan
from monta.planner.search import SearchResult
from monta.plotting import pyplot

_GROUPS = (  # table columns: (header, phases summed)
    ("compute", ("compute/attention", "compute/experts", "compute/lm_head")),
    ("EP inter", ("ep/inter",)),
    ("EP intra", ("ep/intra",)),
    ("EP ovh", ("ep/overhead",)),
    ("TP", ("tp/collectives",)),
    ("PP", ("pp/p2p", "pp/bubble")),
    ("DP", ("dp/grad_sync",)),
)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 100 else f"{seconds * 1e3:.0f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _gb(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def context_line(ctx: PlanContext) -> str:
    cl, m, wl = ctx.cluster, ctx.model, ctx.workload
    return (f"cluster {cl.name}: {cl.nodes} node(s) × {cl.ranks_per_node} ranks, intra "
            f"{cl.intra.bandwidth_GBps:g} GB/s, inter {cl.inter.bandwidth_GBps:g} GB/s × "
            f"{cl.nics_per_node} NIC(s)/node, {cl.device.peak_tflops:g} TFLOP/s "
            f"{cl.device.dtype}, {cl.device.memory_GB:g} GB | model {m.name}: L{m.num_layers} "
            f"h{m.hidden_size} ffn{m.ffn_hidden_size} E{m.num_experts} top-{m.topk} "
            f"({_count(m.total_params())} params) | seq {wl.seq_length}, micro-batch "
            f"{wl.micro_batch_size}, global batch {wl.global_batch(cl.world_size)} | routing "
            f"{ctx.routing.source}")


def format_table(plans: Sequence[Plan], title: str = "") -> str:
    """One row per plan: step time, exposed time per phase group (ms), bytes per link class
    (GB per rank per step), memory per rank."""
    head = ["#", "strategy", "DP", "step ms", "tok/s"] + [g for g, _ in _GROUPS] + [
        "intra GB", "inter GB", "mem GB"]
    rows = []
    for i, p in enumerate(plans, 1):
        secs = p.seconds()
        rows.append([str(i), str(p.candidate), str(p.dp), _ms(p.step_time_s),
                     f"{p.tokens_per_second:,.0f}"]
                    + [_ms(sum(secs.get(n, 0.0) for n in names)) for _, names in _GROUPS]
                    + [f"{p.link_bytes()[link] / 1e9:.2f}" for link in ("intra", "inter")]
                    + [f"{_gb(p.memory.total_GB)}{'' if p.memory.fits else '!'}"])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 1 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines = ([title] if title else []) + [fmt(head), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    """The pick in detail: phases (exposed / alone / bytes), link totals, memory, why, flags."""
    mb = plan.micro_batches
    lines = [f"pick: {plan.candidate}  (DP{plan.dp}, expert-DP{plan.edp}, "
             f"{mb} micro-batch{'es' if mb != 1 else ''}/step)",
             f"  predicted step {plan.step_time_s * 1e3:.1f} ms, "
             f"{plan.tokens_per_second:,.0f} tokens/s",
             "  phase               exposed ms    alone ms   intra GB   inter GB"]
    for p in plan.phases:
        if p.seconds or p.raw_seconds or p.intra_bytes or p.inter_bytes:
            lines.append(f"  {p.name:18s} {p.seconds * 1e3:11.1f} {p.raw_seconds * 1e3:11.1f} "
                         f"{p.intra_bytes / 1e9:10.3f} {p.inter_bytes / 1e9:10.3f}")
    busy = plan.link_seconds()
    lines.append(f"  busy per step: compute {busy['compute'] * 1e3:.1f} ms, intra links "
                 f"{busy['intra'] * 1e3:.1f} ms, inter links {busy['inter'] * 1e3:.1f} ms")
    m = plan.memory
    lines.append(f"  memory/rank: params {_gb(m.params_GB)} + grads {_gb(m.grads_GB)} + "
                 f"optimizer {_gb(m.optimizer_GB)} + activations {_gb(m.activations_GB)} = "
                 f"{_gb(m.total_GB)} GB of {m.capacity_GB:.1f} usable"
                 f"{'' if m.fits else '  (DOES NOT FIT)'}")
    if plan.why:
        lines.append("why:")
        lines += [f"  - {w}" for w in plan.why]
    lines.append("run:")
    lines.append(f"  {plan.command()}")
    return "\n".join(lines)


def result_json(result: SearchResult, ctx: PlanContext, top: int) -> dict:
    """The ranked plans (first ``top``), what was dropped, and the inputs."""
    cl = ctx.cluster
    return {
        "context": context_line(ctx),
        "cluster": dataclasses.asdict(cl),
        "model": dataclasses.asdict(ctx.model),
        "workload": dataclasses.asdict(ctx.workload) | {
            "global_batch": ctx.workload.global_batch(cl.world_size)},
        "routing": ctx.routing.source,
        "evaluated": result.evaluated,
        "rejected": result.rejected,
        "over_memory": len(result.over_memory),
        "ranked": [p.to_dict() for p in result.ranked[:top]],
        "best": result.best.to_dict() if result.best else None,
    }


def plot(plans: Sequence[Plan], path: str | Path, title: str = "") -> str:
    """Stacked horizontal bars of the exposed time per phase for ``plans``; returns the path."""
    plt = pyplot(path, required=True)
    plans = list(plans)[::-1]  # fastest on top
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(plans) + 1.8))
    left = [0.0] * len(plans)
    colors = plt.get_cmap("tab10")
    labels = [f"{p.candidate}" for p in plans]
    for i, name in enumerate(PHASES):
        widths = [p.phase(name).seconds * 1e3 for p in plans]
        if not any(widths):
            continue
        ax.barh(labels, widths, left=left, color=colors(i % 10), label=name)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("predicted step time (ms), exposed time per phase")
    ax.set_title(title or "MoNTA planner: top candidates")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
