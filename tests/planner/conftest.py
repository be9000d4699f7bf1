"""A toy cluster whose numbers make hand computation easy."""

from __future__ import annotations

import pytest

from monta.planner.cluster import cluster_from_dict
from monta.planner.model import ModelSpec


def toy_cluster(**changes):
    """2 nodes x 2 ranks; intra 10 GB/s, inter 1 GB/s per NIC, 1 NIC per node, α = 0; a device of
    1 TFLOP/s at efficiency 1 with no small-GEMM penalty, no launch cost, 1 GB of memory."""
    raw = {"nodes": 2, "ranks_per_node": 2, "nics_per_node": 1,
           "links": {"intra": {"bandwidth_GBps": 10.0, "latency_us": 0.0},
                     "inter": {"bandwidth_GBps": 1.0, "latency_us": 0.0}},
           "device": {"peak_tflops": 1.0, "memory_GB": 1.0, "dtype": "bf16",
                      "gemm_efficiency": 1.0, "grouped_gemm_efficiency": 1.0,
                      "attention_efficiency": 1.0, "gemm_half_rows": 0, "memory_headroom": 1.0,
                      "launch_overhead_us": 0.0}}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            raw[section][name] = value
        else:
            raw[section] = value
    return cluster_from_dict(raw, name="toy")


@pytest.fixture
def toy():
    return toy_cluster()


@pytest.fixture
def make_cluster():
    """``make_cluster(nics_per_node=2, contention={...}, device__dtype="fp32")``."""
    return toy_cluster


@pytest.fixture
def toy_model():
    """L2 h64 ffn128, 4 heads (no GQA), 4 experts top-1, vocabulary 128."""
    return ModelSpec(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=4, num_experts=4, topk=1, vocab_size=128, name="toy")
