"""α-β phases, NIC sharing, contention and the chunked-pipeline formula, by hand."""

from __future__ import annotations

import pytest

from monta.planner.timing import pipeline, ring_time, transfer_time
from monta.planner.volumes import Transfer

US = 1e-6


def test_alpha_beta_with_nic_sharing(toy, make_cluster):
    lat = make_cluster(links={"intra": {"bandwidth_GBps": 10.0, "latency_us": 3.0},
                             "inter": {"bandwidth_GBps": 1.0, "latency_us": 20.0}})
    # 1 MB inter-node from each of the node's 2 ranks over one 1 GB/s NIC: 0.5 GB/s each
    t = transfer_time(Transfer("a2a", "all_to_all", inter_bytes=1e6, calls=2), lat, 2)
    assert t.inter == pytest.approx(1e6 / 0.5e9) and t.latency == pytest.approx(2 * 20 * US)
    assert t.total == pytest.approx(2e-3 + 40 * US)
    # alone on the node it gets the whole NIC; a second NIC does not help one rank
    assert transfer_time(Transfer("a", "all_to_all", inter_bytes=1e6), toy, 1).inter == \
        pytest.approx(1e-3)
    two = make_cluster(nics_per_node=2)
    assert transfer_time(Transfer("a", "all_to_all", inter_bytes=1e6), two, 2).inter == \
        pytest.approx(1e-3)
    assert transfer_time(Transfer("a", "all_to_all", inter_bytes=1e6), two, 4).inter == \
        pytest.approx(2e-3)


def test_flat_all_to_all_uses_both_links_at_once_with_contention(make_cluster):
    cl = make_cluster(contention={"inter_under_intra": 1.5, "intra_under_inter": 2.0})
    tr = Transfer("a2a", "all_to_all", intra_bytes=10e6, inter_bytes=0.5e6)
    t = transfer_time(tr, cl, 1)
    # alone: intra 1 ms, inter 0.5 ms; both busy for the first 0.5 ms, slowed meanwhile:
    # intra 1 + (2.0 − 1) · 0.5 = 1.5 ms, inter 0.5 + (1.5 − 1) · 0.5 = 0.75 ms; max 1.5 ms
    assert (t.intra, t.inter, t.stage) == pytest.approx((1.5e-3, 0.75e-3, 1.5e-3))
    # a tiny intra part (one local peer of many remote ones) barely slows the inter part
    tiny = transfer_time(Transfer("a2a", "all_to_all", intra_bytes=10e3, inter_bytes=0.5e6),
                         cl, 1)
    assert tiny.inter == pytest.approx(0.5e-3 + 0.5 * 1e-6)


def test_measured_node_capacity_caps_the_ranks_together(make_cluster):
    """node_bandwidth_GBps: what a node's ranks get together with every group at once."""
    cl = make_cluster(links={"intra": {"bandwidth_GBps": 10.0, "node_bandwidth_GBps": 8.0},
                             "inter": {"bandwidth_GBps": 1.0, "node_bandwidth_GBps": 1.5}})
    # inter: 2 active ranks get min(1, 1.5 / 2) = 0.75 GB/s each (not the NIC rule's 0.5)
    inter = transfer_time(Transfer("a", "all_to_all", inter_bytes=1.5e6), cl, 2)
    assert inter.inter == pytest.approx(1.5e6 / 0.75e9)
    assert cl.share_GBps("inter", "all_to_all", 1) == 1.0  # alone: its own fit
    # intra: the node's 2 ranks share 8 GB/s → 4 GB/s each (alone 10 GB/s)
    intra = transfer_time(Transfer("g", "all_gather", intra_bytes=4e6), cl, 2)
    assert intra.intra == pytest.approx(1e-3)
    # one rank alone still meets the node's limit: min(10, 8 / 1) = 8 GB/s
    assert transfer_time(Transfer("g", "all_gather", intra_bytes=4e6), cl, 2,
                         intra_active=1).intra == pytest.approx(0.5e-3)
    # a ring of 4 (2 per node): intra hop at 4 GB/s, the node's one ring through 1.5 GB/s → 1
    ring = ring_time(cl, 4, 2, 1e6)
    assert (ring.intra, ring.inter) == pytest.approx((1e6 / 4e9, 1e6 / 1e9))


def test_design_pipeline_formula(toy):
    """DESIGN §2: phases P = (inter 3, intra 2, compute 1) ms on their own resources,
    c chunks → max P + (Σ P − max P)/c + c · L."""
    parts = {"inter": 3e-3, "intra": 2e-3, "compute": 1e-3}
    for chunks in (1, 2, 4, 8):
        p = pipeline(parts, parts, 10 * US, chunks, toy)
        assert p.total == pytest.approx(3e-3 + 3e-3 / chunks + chunks * 10 * US)
        assert sum(p.exposed.values()) == pytest.approx(p.total)
        assert p.bottleneck == "inter" and p.exposed["inter"] == pytest.approx(3e-3)
    # the 4 chunks hide 3/4 of the intra and compute phases
    p = pipeline(parts, parts, 0.0, 4, toy)
    assert p.hidden["intra"] + p.hidden["compute"] == pytest.approx(3e-3 * 3 / 4)


def test_pipeline_when_one_link_carries_two_stages(toy):
    """Dispatch and combine both use the inter link: 2 × 1 ms can never overlap each other, so the
    busiest resource's total M bounds the pipeline, not the longest stage."""
    p = pipeline({"inter": 2e-3, "compute": 0.5e-3}, {"inter": 2e-3, "compute": 0.5e-3}, 0.0,
                 1000, toy)
    assert p.total == pytest.approx(2e-3 + 0.5e-3 / 1000)


def test_contention_slows_the_overlapped_share_only(make_cluster):
    cl = make_cluster(contention={"inter_under_intra": 1.2, "intra_under_inter": 1.1})
    parts = {"inter": 3e-3, "intra": 2e-3}
    assert pipeline(parts, parts, 0.0, 1, cl).total == pytest.approx(5e-3)  # no overlap
    # c = 2: inter chunk 2 (1.5 ms) runs beside intra chunk 1 (1 ms): both busy for
    # min(3, 2) · 1/2 = 1 ms → inter 3 + 0.2 · 1 = 3.2 ms, intra 2 + 0.1 · 1 = 2.1 ms;
    # M + (S − M)/c = 3.2 + 2.1 / 2
    assert pipeline(parts, parts, 0.0, 2, cl).total == pytest.approx(3.2e-3 + 2.1e-3 / 2)


def test_ring_across_nodes_shares_the_nics(toy):
    # group of 4 with 2 members per node: 1 ring per node leaves through the 1 GB/s NIC
    t = ring_time(toy, 4, 2, 1e6, calls=2)
    assert (t.intra, t.inter, t.total) == pytest.approx((1e-4, 1e-3, 1e-3))
    # 1 member per node: each of the node's 2 rings gets half the NIC
    assert ring_time(toy, 2, 1, 1e6).inter == pytest.approx(2e-3)
    assert ring_time(toy, 2, 2, 1e6).inter == 0.0 and ring_time(toy, 1, 1, 1e6).total == 0.0
