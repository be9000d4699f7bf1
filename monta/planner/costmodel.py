"""Step time of one candidate strategy: compute, every communication phase, overlap, bubbles.

Per micro-batch, one PP stage (the last: it also runs the LM head) does, for each of its L/PP
layers (rc = 1 where the part is recomputed, else 0: full recompute reruns every part,
selective the modules it names — ``core_attn`` the core attention, ``moe`` the MoE block;
``layernorm`` and ``moe_act`` rerun elementwise work, which is not modelled):

    attention   (3 + rc) × forward projections + (3 + rc) × forward core attention
                                                               (backward = 2 × forward)
    TP/SP       (2 + rc) × (all-gather + reduce-scatter)       (intra-node, TP inside a node)
    MoE block   (1 + rc) × forward block + backward block; a block is dispatch → experts →
                combine, priced by :func:`monta.planner.timing.pipeline`: sequential for
                ``alltoall`` / ``ds_tp``, over --monta-chunks c chunks for ``monta``
                (backward is pipelined the same way with 2 × the expert compute)

plus the LM head and 2 PP sends (activation, gradient). With m micro-batches per DP rank the
1F1B step takes ``(m + PP − 1) · t_stage`` (the (PP − 1) · t_stage bubble is its own phase),
then the gradient sync over DP (dense) and expert-DP (experts) — not overlapped, as
monta/training/pretrain.py builds DDP with ``overlap_grad_reduce=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

from monta.planner.cluster import ClusterSpec
from monta.planner.compute import layer_flops, layer_times, lm_head_flops, seconds, tokens_per_rank
from monta.planner.layout import Layout, layout_problems
from monta.planner.memory import memory_estimate, params_per_rank
from monta.planner.model import ModelSpec, Workload
from monta.planner.plan import Candidate, PhaseCost, Plan, candidate_flags
from monta.planner.routing import Copies, Routing, expected_copies
from monta.planner.timing import LinkTime, Pipelined, pipeline, ring_time, transfer_time
from monta.planner.volumes import MoEVolume, Transfer, moe_volume, sp_collectives

ASSUMPTIONS = (
    "α is charged once per collective call (bench_comm fits one α per op)",
    "elementwise kernels (norms, activations, permutes) and the optimizer step are not timed",
    "gradient sync is not overlapped with backward (overlap_grad_reduce=False in pretrain.py)",
)


@dataclass(frozen=True)
class PlanContext:
    """Everything a cost evaluation needs besides the candidate."""

    cluster: ClusterSpec
    """The machine."""
    model: ModelSpec
    """The model."""
    workload: Workload
    """Sequence length and batch sizes."""
    routing: Routing = Routing()
    """Uniform, or a measured expert-load histogram."""
    distributed_optimizer: bool = True
    """Shard optimizer state over DP (same bytes as an all-reduce, less memory)."""


def candidate_problems(c: Candidate, ctx: PlanContext) -> list[str]:
    """Why ``c`` cannot run on ``ctx`` (empty when it can)."""
    cl = ctx.cluster
    layout = Layout(cl.world_size, cl.ranks_per_node, c.tp, c.pp, c.ep, c.etp)
    problems = layout_problems(layout, ctx.model, ctx.workload)
    if c.dispatcher == "ds_tp" and c.etp not in (1, c.tp):
        problems.append(f"ds_tp needs ETP 1 or ETP = TP, got TP{c.tp} ETP{c.etp}")
    if c.node_dedup and not problems:
        groups = layout.ep_groups()
        if not any(layout.spans_nodes(g) for g in groups):
            problems.append("node dedup needs an EP group that spans nodes")
    return problems


def _moe_block(vol: MoEVolume, expert_s: float, chunks: int, cluster: ClusterSpec,
               copies: Copies, launch_s: float, hop_s: float) -> tuple[Pipelined, LinkTime]:
    """One MoE block (dispatch → experts → combine) through the chunk pipeline, plus each
    hop's fixed cost (``hop_overhead_us``: paid once per hop, not per chunk)."""
    parts = {"inter": 0.0, "intra": 0.0, "compute": expert_s}
    totals = {"inter": 0.0, "intra": 0.0, "compute": expert_s}
    raw = LinkTime()
    every = vol.dispatch + vol.combine
    for tr in every:
        lt = transfer_time(tr, cluster, cluster.ranks_per_node, inter_scale=copies.node_imbalance,
                           intra_scale=copies.rank_imbalance)
        raw = raw + lt
        totals["inter"] += lt.inter
        totals["intra"] += lt.intra
        parts["inter" if lt.inter >= lt.intra else "intra"] += lt.stage
    latency = raw.latency + launch_s * (len(every) + 1)
    piped = pipeline(parts, totals, latency, chunks, cluster)
    hops = 0.0 if vol.mode == "alltoall" else hop_s * sum(
        1 for tr in every if tr.intra_total + tr.inter_total > 0)
    exposed = piped.exposed | {"overhead": piped.exposed["overhead"] + hops}
    return Pipelined(piped.total + hops, exposed, piped.hidden, piped.bottleneck), raw


def evaluate(c: Candidate, ctx: PlanContext) -> Plan:
    """Cost ``c`` (module docstring); ValueError listing the problems if it cannot run."""
    cl, model, wl = ctx.cluster, ctx.model, ctx.workload
    problems = candidate_problems(c, ctx)
    if problems:
        raise ValueError(f"{c} cannot run on {cl.world_size} ranks: {'; '.join(problems)}")
    layout = Layout(cl.world_size, cl.ranks_per_node, c.tp, c.pp, c.ep, c.etp)
    dev, g = cl.device, cl.ranks_per_node
    b, h = dev.bytes_per_element, model.hidden_size
    tokens = tokens_per_rank(layout, wl)
    copies = expected_copies(layout, model.num_experts, model.topk, ctx.routing)
    vol = moe_volume(c.mode, layout, copies, tokens, h, b, model.num_experts, model.topk)
    flops = layer_flops(model, layout, wl, vol.expert_copies * copies.rank_imbalance)
    chunks = c.chunks if c.dispatcher == "monta" else 1
    times = layer_times(flops, dev, chunks)
    launch_s, hop_s = dev.launch_overhead_us * 1e-6, dev.hop_overhead_us * 1e-6
    full, modules = c.recompute == "full", c.recompute_modules
    rc = 1 if full else 0  # the projections and TP/SP collectives: full recompute only
    rc_core = 1 if full or "core_attn" in modules else 0
    rc_moe = 1 if full or "moe" in modules else 0

    # 1) one layer, one micro-batch
    fwd, fwd_raw = _moe_block(vol, times.experts, chunks, cl, copies, launch_s, hop_s)
    bwd, bwd_raw = _moe_block(vol, 2 * times.experts, chunks, cl, copies, launch_s,
                               hop_s)
    moe_exposed = {k: (1 + rc_moe) * fwd.exposed.get(k, 0.0) + bwd.exposed.get(k, 0.0)
                   for k in ("inter", "intra", "compute", "overhead")}
    moe_raw = {"inter": (1 + rc_moe) * fwd_raw.inter + bwd_raw.inter,
               "intra": (1 + rc_moe) * fwd_raw.intra + bwd_raw.intra,
               "compute": (3 + rc_moe) * times.experts}
    sp = sp_collectives(layout, tokens, h, b)
    sp_s = sum(transfer_time(tr, cl, g).total for tr in sp) * (2 + rc)
    sp_bytes = sum(tr.intra_total for tr in sp) * (2 + rc)
    attention_s = times.projections * (3 + rc) + times.core_attention * (3 + rc_core)

    # 2) the stage: L/PP layers + LM head (+ embedding with PP1) + PP sends
    lps = model.num_layers // c.pp
    head_s = 3 * seconds(lm_head_flops(model, layout, wl), dev, dev.gemm_efficiency)
    edge = Transfer("sp_head", "all_gather", (c.tp - 1) * tokens * h * b) if c.tp > 1 else None
    edges = 2 if c.pp == 1 else 1  # LM head (AG fwd + RS bwd); with PP1 the embedding too
    head_tp_s = 2 * edges * transfer_time(edge, cl, g).total if edge else 0.0
    head_tp_bytes = 2 * edges * edge.intra_total if edge else 0.0
    p2p_s = p2p_inter = p2p_intra = 0.0
    if c.pp > 1:
        link = "inter" if cl.nodes > 1 else "intra"
        nbytes = tokens * h * b
        send = Transfer("p2p", "p2p", **{f"{link}_bytes": nbytes})
        p2p_s = 2 * transfer_time(send, cl, min(g, layout.stage_size)).total
        p2p_inter, p2p_intra = (2 * nbytes, 0.0) if link == "inter" else (0.0, 2 * nbytes)
    stage_s = (lps * (attention_s + sp_s + sum(moe_exposed.values())) + head_s + head_tp_s
               + p2p_s)

    # 3) the step: 1F1B over m micro-batches, then the gradient sync
    gbs = wl.global_batch(cl.world_size)
    m = gbs // (wl.micro_batch_size * layout.dp)
    dense, experts = params_per_rank(model, layout, c.pp - 1)
    grad_b, param_b = 4, b  # fp32 main grads; bf16/fp32 params
    sync = LinkTime()
    sync_bytes = {"intra": 0.0, "inter": 0.0}
    for params, group in ((dense, layout.dp_group()), (experts, layout.edp_group())):
        n = len(group)
        if n <= 1:
            continue
        per_node = layout.members_per_node(group)
        vol_b = ((n - 1) / n * params * (grad_b + param_b) if ctx.distributed_optimizer
                 else 2 * (n - 1) / n * params * grad_b)
        sync = sync + ring_time(cl, n, per_node, vol_b, "reduce_scatter", calls=2)
        crossing = vol_b / per_node if per_node < n else 0.0
        sync_bytes["inter"] += crossing
        sync_bytes["intra"] += vol_b - crossing
    sync_s = sync.total
    step_s = (m + c.pp - 1) * stage_s + sync_s

    # 4) the phases (exposed seconds sum to the step)
    per_layers = m * lps
    ep_intra_b, ep_inter_b = (x * (2 + rc_moe) * per_layers for x in vol.totals())
    phases = (
        PhaseCost("compute/attention", per_layers * attention_s, per_layers * attention_s),
        PhaseCost("compute/experts", per_layers * moe_exposed["compute"],
                  per_layers * moe_raw["compute"]),
        PhaseCost("compute/lm_head", m * head_s, m * head_s),
        PhaseCost("tp/collectives", m * (lps * sp_s + head_tp_s), m * (lps * sp_s + head_tp_s),
                  m * (lps * sp_bytes + head_tp_bytes), 0.0, "intra"),
        PhaseCost("ep/inter", per_layers * moe_exposed["inter"], per_layers * moe_raw["inter"],
                  0.0, ep_inter_b, "inter"),
        PhaseCost("ep/intra", per_layers * moe_exposed["intra"], per_layers * moe_raw["intra"],
                  ep_intra_b, 0.0, "intra"),
        PhaseCost("ep/overhead", per_layers * moe_exposed["overhead"],
                  per_layers * moe_exposed["overhead"], 0.0, 0.0, "idle"),
        PhaseCost("pp/p2p", m * p2p_s, m * p2p_s, m * p2p_intra, m * p2p_inter,
                  "inter" if p2p_inter else "intra"),
        PhaseCost("pp/bubble", (c.pp - 1) * stage_s, 0.0, 0.0, 0.0, "idle"),
        PhaseCost("dp/grad_sync", sync_s, sync_s, sync_bytes["intra"], sync_bytes["inter"],
                  "inter" if sync.inter > sync.intra else "intra"),
    )
    memory = memory_estimate(model, layout, wl, dev, vol.held_rows, copies.rank_imbalance,
                             c.recompute, m, ctx.distributed_optimizer, c.dispatcher == "ds_tp")
    flags = (model.flags() + wl.flags(cl.world_size)
             + candidate_flags(c, layout.dp, layout.edp, g, dev.dtype == "bf16",
                               ctx.distributed_optimizer))
    notes = tuple(cl.notes) + ASSUMPTIONS
    if not ctx.routing.uniform:
        notes += (f"routing from {ctx.routing.source}: busiest EP rank carries "
                  f"{copies.rank_imbalance:.2f}× the mean load",)
    return Plan(candidate=c, world_size=cl.world_size, nodes=cl.nodes, ranks_per_node=g,
                dp=layout.dp, edp=layout.edp, micro_batches=m,
                tokens_per_step=gbs * wl.seq_length, step_time_s=step_s, phases=phases,
                memory=memory, flags=tuple(flags), launch=cl.launch_prefix(), notes=notes)
