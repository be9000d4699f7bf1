"""α-β times of collectives on the cluster's links, NIC sharing, contention, chunked pipelines.

* One collective on one link class: ``calls · α_op + bytes / β_op`` (bench_comm's fit of that
  op; α is per collective call, as bench_comm fits it). Inter-node β is the rank's share of its
  node's NICs while ``active`` ranks of the node send: ``min(β, β · nics / active)``.
* A collective that uses both classes at once (a flat all-to-all over an EP group spanning
  nodes) takes ``max(t_intra · c_intra_under_inter, t_inter · c_inter_under_intra)``.
* A pipeline of stages over c chunks (DESIGN §2): ``M + (S − M)/c + c · L`` where S is the sum
  of the stage times (the unpipelined time), M the busiest resource's total (inter link, intra
  link or compute; with one resource per stage this is DESIGN's max_i P_i) and L the per-chunk
  overhead (every collective's α plus a launch cost per stage). While inter- and intra-node
  phases overlap ((c − 1)/c of the time) they slow down by the contention factors.
* A ring over a group with g members per node: every link carries ``vol`` bytes; the node's
  G/g rings share its NICs, so ``t = max(vol / β_intra, vol / share(G/g))`` across nodes.
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
                  inter_scale: float = 1.0, intra_scale: float = 1.0) -> LinkTime:
    """One collective's time (module docstring).

    Args:
        inter_active: ranks of a node sending inter-node at the same time (NIC sharing).
        inter_scale, intra_scale: load factors of the busiest node / rank (routing imbalance).
    """
    intra_b, inter_b = tr.intra_total * intra_scale, tr.inter_total * inter_scale
    latency = 0.0
    t_intra = t_inter = 0.0
    if intra_b > 0:
        fit = cluster.intra.fit(tr.op)
        t_intra = intra_b / (fit.bandwidth_GBps * 1e9)
        latency = tr.calls * fit.latency_us * 1e-6
    if inter_b > 0:
        fit = cluster.inter.fit(tr.op)
        share = min(fit.bandwidth_GBps,
                    fit.bandwidth_GBps * cluster.nics_per_node / max(1, inter_active))
        t_inter = inter_b / (share * 1e9)
        latency = max(latency, tr.calls * fit.latency_us * 1e-6)
    if t_intra > 0 and t_inter > 0:
        c = cluster.contention
        t_intra, t_inter = t_intra * c.intra_under_inter, t_inter * c.inter_under_intra
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
    overlap = (c - 1) / c
    scale = {"inter": 1.0, "intra": 1.0}
    if resource_totals.get("inter", 0) > 0 and resource_totals.get("intra", 0) > 0:
        scale["inter"] += (cluster.contention.inter_under_intra - 1) * overlap
        scale["intra"] += (cluster.contention.intra_under_inter - 1) * overlap
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
    intra_fit = cluster.intra.fit(op)
    t_intra = nbytes / (intra_fit.bandwidth_GBps * 1e9) if members_per_node > 1 else 0.0
    latency = calls * intra_fit.latency_us * 1e-6
    t_inter = 0.0
    if members_per_node < group_size:  # the ring leaves the node
        fit = cluster.inter.fit(op)
        rings = max(1, cluster.ranks_per_node // members_per_node)
        share = min(fit.bandwidth_GBps, fit.bandwidth_GBps * cluster.nics_per_node / rings)
        t_inter = nbytes / (share * 1e9)
        latency = calls * fit.latency_us * 1e-6
    return LinkTime(t_intra, t_inter, latency, max(t_intra, t_inter))
