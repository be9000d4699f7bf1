"""α-β times of collectives on the cluster's links, link sharing, contention, chunked pipelines.

* One collective on one link class: ``calls · α_op + bytes / β`` (bench_comm's fit of that op;
  α is per collective call, as bench_comm fits it). β is a rank's share while ``active`` ranks
  of its node use the class at once: ``min(β_op, B_node / active)`` (``ClusterSpec.share_GBps``:
  B_node is the node's measured capacity with every group at once, else the NICs' limit
  ``β_op · nics`` inter-node and no limit intra-node).
* A collective that uses both classes at once (a flat all-to-all over an EP group spanning
  nodes): each class takes its own time, and while both are busy — the shorter of the two —
  each is slowed by its contention factor: ``t_c + (f_c − 1) · min(t_intra, t_inter)``; the
  collective takes the max.
* A pipeline of stages over c chunks (DESIGN §2): ``M + (S − M)/c + c · L`` where S is the sum
  of the stage times (the unpipelined time), M the busiest resource's total (inter link, intra
  link or compute; with one resource per stage this is DESIGN's max_i P_i) and L the per-chunk
  overhead (every collective's α plus a launch cost per stage). Inter- and intra-node stages
  of different chunks overlap for ``min(inter, intra) · (c − 1)/c`` and are slowed by the
  contention factors for that long.
* A ring over a group with g members per node: every link carries ``vol`` bytes; the node's
  G/g rings share its NICs (and every rank of the node takes part in some ring), so
  ``t = max(vol / share_intra(G), vol / share_inter(G/g))`` across nodes.

Contention factors come from bench_comm with both classes about equally long, i.e. they are
slowdowns *while overlapped*; charging them only for the overlap keeps a collective whose
intra-node part is tiny (EP over nodes, one local peer) from being slowed as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from monta.planner.cluster import ClusterSpec
from monta.planner.volumes import Transfer


@dataclass(frozen=True)
class LinkTime:
    """Seconds of one collective (or a sum of them), split for pipelining."""

    intra: float = 0.0
    """Bandwidth time on intra-node links."""
    inter: float = 0.0
    """Bandwidth time on inter-node links."""
    latency: float = 0.0
    """α terms (per chunk when pipelined)."""
    stage: float = 0.0
    """Time of the collective alone: max of the classes it uses (contention applied), no α."""

    def __add__(self, other: "LinkTime") -> "LinkTime":
        return LinkTime(self.intra + other.intra, self.inter + other.inter,
                        self.latency + other.latency, self.stage + other.stage)

    @property
    def total(self) -> float:
        return self.stage + self.latency


def transfer_time(tr: Transfer, cluster: ClusterSpec, inter_active: int,
                  inter_scale: float = 1.0, intra_scale: float = 1.0,
                  intra_active: int | None = None) -> LinkTime:
    """One collective's time (module docstring).

    Args:
        inter_active: ranks of a node sending inter-node at the same time (NIC sharing).
        inter_scale, intra_scale: load factors of the busiest node / rank (routing imbalance).
        intra_active: ranks of a node sending intra-node at the same time (default: all G, as
            every rank runs the same collective).
    """
    intra_b, inter_b = tr.intra_total * intra_scale, tr.inter_total * inter_scale
    latency = 0.0
    t_intra = t_inter = 0.0
    if intra_b > 0:
        active = cluster.ranks_per_node if intra_active is None else intra_active
        t_intra = intra_b / (cluster.share_GBps("intra", tr.op, active) * 1e9)
        latency = tr.calls * cluster.intra.fit(tr.op).latency_us * 1e-6
    if inter_b > 0:
        t_inter = inter_b / (cluster.share_GBps("inter", tr.op, inter_active) * 1e9)
        latency = max(latency, tr.calls * cluster.inter.fit(tr.op).latency_us * 1e-6)
    if t_intra > 0 and t_inter > 0:
        c = cluster.contention
        both = min(t_intra, t_inter)  # how long the two classes are busy at once
        t_intra, t_inter = (t_intra + (c.intra_under_inter - 1) * both,
                            t_inter + (c.inter_under_intra - 1) * both)
    return LinkTime(t_intra, t_inter, latency, max(t_intra, t_inter))


@dataclass(frozen=True)
class Pipelined:
    """A chunked pipeline's total and who is exposed (see :func:`pipeline`)."""

    total: float
    exposed: dict
    """resource → seconds on the critical path; they sum to ``total``."""
    hidden: dict
    """resource → seconds overlapped with the bottleneck."""
    bottleneck: str


def pipeline(stage_parts: dict[str, float], resource_totals: dict[str, float],
             latency: float, chunks: int, cluster: ClusterSpec) -> Pipelined:
    """``M + (S − M)/c + c · L`` with contention on the overlapped share (module docstring).

    Args:
        stage_parts: resource → its share of the unpipelined time S (a stage that uses two
            resources at once is charged to the slower one and the excess of the other).
        resource_totals: resource → total busy time (M is the max).
        latency: L, per-chunk overhead seconds.
    """
    c = max(1, chunks)
    scale = {"inter": 1.0, "intra": 1.0}
    inter, intra = resource_totals.get("inter", 0.0), resource_totals.get("intra", 0.0)
    if inter > 0 and intra > 0:
        both = min(inter, intra) * (c - 1) / c  # chunks of the two classes in flight at once
        scale["inter"] += (cluster.contention.inter_under_intra - 1) * both / inter
        scale["intra"] += (cluster.contention.intra_under_inter - 1) * both / intra
    parts = {r: v * scale.get(r, 1.0) for r, v in stage_parts.items()}
    totals = {r: v * scale.get(r, 1.0) for r, v in resource_totals.items()}
    s = sum(parts.values())
    bottleneck = max(totals, key=totals.get) if totals else "compute"
    m = min(totals.get(bottleneck, 0.0), s)
    body = m + (s - m) / c
    exposed = {bottleneck: min(parts.get(bottleneck, 0.0), body)}
    rest = body - exposed[bottleneck]
    others = {r: v for r, v in parts.items() if r != bottleneck}
    others_sum = sum(others.values())
    for r, v in others.items():
        exposed[r] = rest * v / others_sum if others_sum > 0 else 0.0
    if others_sum <= 0 and rest > 0:
        exposed[bottleneck] += rest
    exposed["overhead"] = c * latency
    hidden = {r: max(0.0, parts.get(r, 0.0) - exposed.get(r, 0.0)) for r in parts}
    return Pipelined(body + c * latency, exposed, hidden, bottleneck)


def ring_time(cluster: ClusterSpec, group_size: int, members_per_node: int, nbytes: float,
              op: str = "all_reduce", calls: int = 1) -> LinkTime:
    """A ring collective moving ``nbytes`` per rank per link (module docstring)."""
    if group_size <= 1 or nbytes <= 0:
        return LinkTime()
    g = cluster.ranks_per_node
    t_intra = (nbytes / (cluster.share_GBps("intra", op, g) * 1e9) if members_per_node > 1
               else 0.0)
    latency = calls * cluster.intra.fit(op).latency_us * 1e-6
    t_inter = 0.0
    if members_per_node < group_size:  # the ring leaves the node
        rings = max(1, g // members_per_node)
        t_inter = nbytes / (cluster.share_GBps("inter", op, rings) * 1e9)
        latency = calls * cluster.inter.fit(op).latency_us * 1e-6
    return LinkTime(t_intra, t_inter, latency, max(t_intra, t_inter))
