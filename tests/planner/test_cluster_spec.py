"""Cluster specs: presets, bench_comm's YAML shape, overrides, NIC sharing, errors."""

from __future__ import annotations

import pytest
import yaml

from monta.planner.cluster import cluster_from_dict, list_presets, load_cluster

# what tools/bench_comm.py writes (cluster_spec()), with its extra keys and a missing contention
BENCH_COMM_YAML = """
nodes: 2
ranks_per_node: 2
links:
  intra:
    bandwidth_GBps: 1.4
    latency_us: 80.0
    fit_op: all_to_all
    group_size: 2
    ops:
      all_to_all: {bandwidth_GBps: 1.4, latency_us: 80.0}
      all_gather: {bandwidth_GBps: 1.2, latency_us: 60.0}
      p2p: {bandwidth_GBps: null, latency_us: null}
  inter:
    bandwidth_GBps: 0.07
    latency_us: 400.0
contention: {inter_under_intra: 1.3, intra_under_inter: null}
measured_on: testbed
date: '2026-11-30'
load_average: [0.1, 0.2, 0.3]
source: tools/bench_comm.py
"""


def test_presets_load_with_documented_numbers():
    assert {"a800_hdr200", "h100_ndr400", "testbed_1gbit"} <= set(list_presets())
    a800 = load_cluster("a800_hdr200")
    assert (a800.nodes, a800.ranks_per_node, a800.nics_per_node) == (2, 8, 4)
    assert a800.intra.bandwidth_GBps == 200 and a800.inter.bandwidth_GBps == 25
    assert a800.device.peak_tflops == 312 and a800.device.memory_GB == 80
    h100 = load_cluster("h100_ndr400")
    assert (h100.world_size, h100.nics_per_node, h100.intra.bandwidth_GBps) == (64, 8, 450)
    assert h100.device.peak_tflops == 989
    bed = load_cluster("testbed_1gbit")
    assert bed.device.dtype == "fp32" and bed.device.bytes_per_element == 4
    assert bed.inter.bandwidth_GBps == 0.12 and "monta.testbed" in bed.launch_prefix()


def test_bench_comm_yaml_needs_a_device_and_takes_overrides():
    raw = yaml.safe_load(BENCH_COMM_YAML)
    with pytest.raises(ValueError, match=r"no device \['peak_tflops', 'memory_GB'\]"):
        cluster_from_dict(raw)
    spec = cluster_from_dict(raw, overrides={"peak_tflops": 0.05, "memory_GB": 5.0})
    assert spec.contention.inter_under_intra == 1.3 and spec.contention.intra_under_inter == 1.0
    assert spec.intra.fit("all_gather").bandwidth_GBps == 1.2  # per-op fit used
    assert spec.intra.fit("reduce_scatter").bandwidth_GBps == 1.4  # headline fallback
    assert "p2p" not in spec.intra.ops  # null fits are ignored
    assert spec.nics_per_node == 1 and any("nics_per_node" in n for n in spec.notes)


def test_nic_sharing_and_world_cut():
    a800 = load_cluster("a800_hdr200")
    # 4 NICs x 25 GB/s shared by 8 ranks; one rank alone still drives only one NIC
    assert a800.inter_share_GBps(8) == pytest.approx(12.5)
    assert a800.inter_share_GBps(2) == pytest.approx(25.0)
    assert a800.with_world(8).nodes == 1 and a800.with_world(4).ranks_per_node == 4
    with pytest.raises(ValueError, match="--world 12"):
        a800.with_world(12)


def test_bad_specs_name_the_offending_values():
    raw = yaml.safe_load(BENCH_COMM_YAML)
    raw["device"] = {"peak_tflops": 1, "memory_GB": 1, "gemm_efficiency": 1.5}
    with pytest.raises(ValueError, match="gemm_efficiency must be in \\(0, 1\\], got 1.5"):
        cluster_from_dict(raw)
    raw["device"] = {"peak_tflops": 1, "memory_GB": 1}
    raw["contention"] = {"inter_under_intra": 0.5}
    with pytest.raises(ValueError, match="inter_under_intra must be >= 1.0.*0.5"):
        cluster_from_dict(raw)
    with pytest.raises(ValueError, match="neither a file nor a preset"):
        load_cluster("no_such_cluster")
