"""Where tokens go: uniform routing or a measured expert-load histogram, and the expected
number of row copies each dispatcher mode sends per token.

A token picks k *distinct* experts. For a set S of experts that receives the share F_S of all
picks (uniform: F_S = |S|/E), the chance that a token misses S entirely is taken as

    P(miss S) = Π_{j=0..k−1} max(0, 1 − F_S · E/(E − j))

which is exactly the hypergeometric C(E − |S|, k)/C(E, k) under uniform routing (the formula of
``bench/dispatch_bytes.py``) and a without-replacement approximation for skewed loads.
Expected copies per token a source rank sends (EP group of e ranks, m = E/e experts each;
f_r = F of rank r's experts, P_r = 1 − P(miss rank r), P_n the same for node n):

    alltoall     one per (token, expert)       inter Σ_{r remote} k·f_r
                                                 intra Σ_{r local≠me} k·f_r
    monta flat   one per (token, owner rank)   inter Σ_{r remote} P_r
                                                 intra Σ_{r local≠me} P_r
    monta dedup  one per (token, remote node)  inter Σ_{n remote} P_n
                 + the gateways' fan-out         intra Σ_{r local≠me} P_r
                                                       + Σ_{n remote} (Σ_{r∈n} P_r − P_n)
    ds_tp        TP × monta flat (every TP rank sends all TP·T tokens)

Rows landing at owners (what an expert-TP all-gather moves): k per token for alltoall, Σ_r P_r
for monta. Averages are over every source rank of every EP group (megatron's rank grid).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from monta.planner.layout import Layout

_TB_TAG = re.compile(r"expert-load/layer(\d+)/expert(\d+)$")


@dataclass(frozen=True)
class Routing:
    """Per-layer expert-load fractions, or uniform (``layers == ()``)."""

    layers: tuple[tuple[float, ...], ...] = ()
    """One tuple of E fractions (summing to 1) per measured layer; empty = uniform."""
    source: str = "uniform"
    """Where the histogram came from (for the plan's notes)."""

    @property
    def uniform(self) -> bool:
        return not self.layers

    def fractions(self, num_experts: int) -> tuple[tuple[float, ...], ...]:
        if self.uniform:
            return ((1.0 / num_experts,) * num_experts,)
        if any(len(layer) != num_experts for layer in self.layers):
            raise ValueError(f"expert-load histogram from {self.source} has "
                             f"{sorted({len(l) for l in self.layers})} experts per layer, the "
                             f"model has {num_experts}")
        return self.layers


def _normalise(values: list[float], where: str) -> tuple[float, ...]:
    if not values or any((not isinstance(v, (int, float))) or v < 0 for v in values):
        raise ValueError(f"expert loads in {where} must be non-negative numbers, got {values!r}")
    total = float(sum(values))
    if total <= 0:
        raise ValueError(f"expert loads in {where} sum to {total}")
    return tuple(v / total for v in values)


def routing_from_obj(obj: Any, where: str = "histogram") -> Routing:
    """A histogram from parsed JSON: a list of per-expert loads, a list of such lists (one per
    layer), ``{"layers": [[...], ...]}``, ``{"layer1": [...], ...}``, or a TensorBoard scalar
    dump ``{"expert-load/layer1/expert0": 0.12, ...}`` (counts or fractions; each layer is
    normalised)."""
    if isinstance(obj, dict) and "layers" in obj:
        obj = obj["layers"]
    if isinstance(obj, dict):
        tagged: dict[int, dict[int, float]] = {}
        for key, value in obj.items():
            match = _TB_TAG.search(str(key))
            if match:
                tagged.setdefault(int(match[1]), {})[int(match[2])] = float(value)
        if tagged:
            layers = []
            for layer in sorted(tagged):
                experts = tagged[layer]
                if sorted(experts) != list(range(len(experts))):
                    raise ValueError(f"layer {layer} of {where} has experts {sorted(experts)}")
                layers.append(_normalise([experts[e] for e in range(len(experts))],
                                         f"{where} layer {layer}"))
            return Routing(tuple(layers), where)
        obj = [obj[k] for k in sorted(obj, key=lambda k: int(re.sub(r"\D", "", k) or 0))]
    if isinstance(obj, list) and obj and all(isinstance(v, (int, float)) for v in obj):
        return Routing((_normalise(obj, where),), where)
    if isinstance(obj, list) and obj and all(isinstance(v, list) for v in obj):
        return Routing(tuple(_normalise(v, f"{where} layer {i + 1}") for i, v in enumerate(obj)),
                       where)
    raise ValueError(f"cannot read an expert-load histogram from {where}: expected a list of "
                     f"per-expert loads, a list of lists, or expert-load/layerL/expertE scalars")


def load_routing(spec: str | None) -> Routing:
    """``None``/"uniform" → uniform; a JSON file (see :func:`routing_from_obj`); or a
    TensorBoard event directory/file (the last value of each ``expert-load`` scalar)."""
    if spec is None or spec == "uniform":
        return Routing()
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"routing histogram {spec!r} does not exist (give a JSON file, a "
                         f"TensorBoard directory, or 'uniform')")
    if path.suffix == ".json":
        return routing_from_obj(json.loads(path.read_text()), str(path))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags().get("scalars", [])
               if _TB_TAG.search(tag)}
    return routing_from_obj(scalars, str(path))


def p_hit(share: float, num_experts: int, topk: int) -> float:
    """P(a token's k distinct picks hit a set holding ``share`` of the load) (module docstring)."""
    miss = 1.0
    for j in range(topk):
        miss *= max(0.0, 1.0 - share * num_experts / (num_experts - j))
    return 1.0 - miss


@dataclass(frozen=True)
class Copies:
    """Expected row copies per token of one source rank (averaged), forward dispatch."""

    alltoall_inter: float
    alltoall_intra: float
    flat_inter: float
    flat_intra: float
    dedup_inter: float
    dedup_intra: float
    rows_at_owners: float
    """Σ_r P_r: monta rows landing at owner ranks (incl. kept ones) per source token."""
    ep_nodes: float
    """Average number of nodes an EP group spans."""
    rank_imbalance: float
    """Mean over layers of max_r(f_r)·EP (1 = balanced): the busiest owner's extra load."""
    node_imbalance: float
    """Mean over layers of max_n(F_n)·N_ep: the busiest node's extra inter-node receive."""


def expected_copies(layout: Layout, num_experts: int, topk: int,
                    routing: Routing = Routing()) -> Copies:
    """Average expected copies per token over all source ranks (see the module docstring)."""
    fractions = routing.fractions(num_experts)
    return _copies_cached(layout.world, layout.ranks_per_node, layout.tp, layout.pp, layout.ep,
                          layout.etp, num_experts, topk, fractions)


@lru_cache(maxsize=4096)
def _copies_cached(world, ranks_per_node, tp, pp, ep, etp, num_experts, topk, fractions):
    layout = Layout(world, ranks_per_node, tp, pp, ep, etp)
    m = num_experts // ep
    patterns: dict[tuple[int, ...], int] = {}
    for group in layout.ep_groups():  # identical node patterns give identical averages
        nodes = [layout.node(r) for r in group]
        relabel: dict[int, int] = {}
        key = tuple(relabel.setdefault(n, len(relabel)) for n in nodes)
        patterns[key] = patterns.get(key, 0) + 1
    sums = [0.0] * 10
    count = 0
    for pattern, weight in patterns.items():
        for layer in fractions:
            values = _group_copies(pattern, layer, m, num_experts, topk)
            sums = [s + weight * v for s, v in zip(sums, values)]
        count += weight
    n = count * len(fractions)
    return Copies(*(s / n for s in sums))


def _group_copies(pattern, layer, m, num_experts, topk):
    """Per-token copies averaged over the sources of one EP group (node ``pattern``)."""
    ep = len(pattern)
    f_rank = [sum(layer[i * m:(i + 1) * m]) for i in range(ep)]
    p_rank = [p_hit(f, num_experts, topk) for f in f_rank]
    nodes = sorted(set(pattern))
    f_node = {n: sum(f for f, pn in zip(f_rank, pattern) if pn == n) for n in nodes}
    p_node = {n: p_hit(f_node[n], num_experts, topk) for n in nodes}
    sum_p_node_ranks = {n: sum(p for p, pn in zip(p_rank, pattern) if pn == n) for n in nodes}
    out = [0.0] * 6
    for me, my_node in enumerate(pattern):
        remote = [i for i, pn in enumerate(pattern) if pn != my_node]
        local = [i for i, pn in enumerate(pattern) if pn == my_node and i != me]
        out[0] += topk * sum(f_rank[i] for i in remote)
        out[1] += topk * sum(f_rank[i] for i in local)
        out[2] += sum(p_rank[i] for i in remote)
        out[3] += sum(p_rank[i] for i in local)
        remote_nodes = [n for n in nodes if n != my_node]
        out[4] += sum(p_node[n] for n in remote_nodes)
        out[5] += (sum(p_rank[i] for i in local)
                   + sum(sum_p_node_ranks[n] - p_node[n] for n in remote_nodes))
    rank_imb = max(f_rank) * ep
    node_imb = max(f_node.values()) * len(nodes)
    return [v / ep for v in out] + [sum(p_rank), float(len(nodes)), rank_imb, node_imb]


def imbalance_of(routing: Routing, num_experts: int) -> float:
    """max-over-mean expert load averaged over layers (the ``expert-load/max-over-mean``
    scalar of monta/training/metrics.py)."""
    layers = routing.fractions(num_experts)
    return sum(max(layer) * num_experts for layer in layers) / len(layers) if layers else math.nan
