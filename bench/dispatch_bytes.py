"""Forward-dispatch bytes per link class: ``ds_tp``, stock ``alltoall`` and ``monta`` (node dedup
off / on), side by side on emulated multi-node CPU jobs.

Launch (repo root, venv active)::

    python bench/dispatch_bytes.py                  # full sweep (~1.5 min on 2 cores)
    python bench/dispatch_bytes.py --quick          # world-4 configs only (smoke test, ~15 s)
    python bench/dispatch_bytes.py --out /tmp/x.json

Writes ``bench/results/dispatch_bytes.json`` (config, machine, git commit, timestamp, rows) and the
same table as Markdown next to it (``.md``), and prints the table.

What runs. One spawned gloo job per topology (``MONTA_RANKS_PER_NODE`` = G consecutive ranks form
a node). Inside a job, for every parallel layout (TP, EP, ETP) and top-k, the four candidates run
interleaved on the *same* router weights and the *same* tokens: T_r = 256 random fp32 tokens of
hidden 64 per rank (each rank's sequence-parallel shard, so every rank's tokens are distinct),
one megatron-core MoE layer (``use_cpu_initialization=True`` after ``torch.manual_seed``, no load
balancing loss, dropless), forward + backward. Bytes come from :mod:`monta.comm`'s counters
(exact payload per rank pair, classified intra/inter by the emulated topology) and are summed over
all ranks. Byte counts are deterministic for a fixed seed, so each case runs once; wall time on
2 cores is meaningless here and is not reported per case.

What is reported, per config and dispatcher (D = world · T_r distinct tokens in the global batch,
h = hidden, b = 4 bytes per fp32 element):

* ``inter`` / ``intra`` copies per token = forward dispatch payload bytes / (D · h · b). Payload =
  the tags ``layer1/dispatch/*`` (flat, inter, intra, etp_gather) plus ``layer1/tp_gather`` (ds_tp's
  all-gather of the TP group's tokens before it dispatches; also shown on its own), excluding
  ``/meta`` (router probabilities and masks) and ``/bwd``. Combine and backward are in the JSON's
  per-tag totals; they mirror dispatch.
* ``meta`` bytes per token: the forward ``/meta`` tags (probs fp32 + masks), intra + inter. Split
  counts exchanged before each all-to-all (a few ints per peer) are not counted by any dispatcher.
* ratios of inter bytes: alltoall / monta and ds_tp / monta, for monta with dedup off and on.
* ``routing check``: the inter rows predicted from the routing maps the router actually produced
  (alltoall: one copy per (token, remote-node expert); monta flat: per (token, remote-node owner
  rank); monta dedup: per (token, remote node); ds_tp: TP × monta flat) must equal the counters.

Uniform-routing expectation (the "uniform" column). Each token picks k *distinct* experts, every
k-subset of the E experts equally likely. Experts sit contiguously on the EP group's e ranks
(m = E/e per rank); the EP group spans N nodes with e/N ranks each, and the token's own rank is
one of them. Expected inter copies per token:

    alltoall     k · (N − 1)/N                             (each chosen expert is remote w.p. (N−1)/N)
    monta flat   (N − 1)·(e/N) · [1 − C(E − m, k)/C(E, k)]  (remote owner ranks hit at least once)
    monta dedup  (N − 1) · [1 − C(E − E/N, k)/C(E, k)]      (remote nodes hit at least once)
    ds_tp        TP × monta flat                            (every TP rank sends all TP·T_r tokens)

C(E − M, k)/C(E, k) is the hypergeometric chance that none of the k picks falls among M given
experts. For E ≫ k it tends to (1 − M/E)^k, and dedup's line becomes DESIGN §2's
u − 1 = (N − 1)·(1 − (1 − 1/N)^k) (u distinct nodes, minus the token's own); the JSON keeps that
approximation too (``design_approx_inter``). The implementation evaluates these sums from the
real EP groups and topology, so it also covers uneven spreads. The measured values use the
randomly initialised router, whose choices are neither uniform nor independent across tokens,
so they differ from the expectation (by a few percent here).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "dispatch_bytes.json"

HIDDEN = 64
FFN_HIDDEN = 32  # divisible by every expert-TP size below (SwiGLU shards 2·FFN / ETP)
TOKENS_PER_RANK = 256  # each rank's sequence-parallel shard: distinct tokens
BYTES_PER_ELEMENT = 4  # fp32
SEED = 1234
JOB_TIMEOUT_S = 600

# (label, --moe-token-dispatcher-type, node_dedup); run interleaved in this order per config
CANDIDATES = (
    ("ds_tp", "ds_tp", "off"),
    ("alltoall", "alltoall", "off"),
    ("monta/flat", "monta", "off"),
    ("monta/dedup", "monta", "on"),
)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One point of the sweep: topology, parallel layout and routing."""

    world: int
    ranks_per_node: int
    tp: int
    ep: int
    etp: int
    topk: int
    experts: int = 8

    @property
    def nodes(self) -> int:
        return self.world // self.ranks_per_node

    @property
    def layout(self) -> tuple[int, int, int]:
        return (self.tp, self.ep, self.etp)

    @property
    def name(self) -> str:
        return (f"{self.nodes}x{self.ranks_per_node} TP{self.tp}·EP{self.ep}·ETP{self.etp} "
                f"E{self.experts} top{self.topk}")


def sweep(quick: bool) -> list[SweepConfig]:
    """World 4 = 2 nodes × 2; world 8 = 2 nodes × 4 and 4 nodes × 2; world 16 = 2 nodes × 8
    with TP 8 (all but world 4 skipped with ``quick``)."""
    topks = (1, 2, 4, 8)
    configs = [SweepConfig(4, 2, tp, ep, etp, k)
               for tp, ep, etp in ((1, 4, 1), (2, 2, 2)) for k in topks]
    if quick:
        return configs
    # 2 nodes × 4: TP shards experts too (ETP = TP) or not (ETP 1, the MoNTA paper's TP·EP)
    for tp, ep, etp in ((1, 8, 1), (2, 4, 2), (4, 2, 4), (2, 8, 1), (4, 8, 1)):
        configs += [SweepConfig(8, 4, tp, ep, etp, k) for k in topks]
    configs.append(SweepConfig(8, 4, 1, 8, 1, 8, experts=64))
    configs += [SweepConfig(8, 2, 1, 8, 1, k) for k in topks]
    configs.append(SweepConfig(8, 2, 1, 8, 1, 8, experts=64))
    # the MoNTA paper's TP = 8 inside each of 2 nodes (16 ranks; small sizes keep it cheap)
    for tp, ep, etp in ((8, 2, 8), (8, 8, 1)):
        configs += [SweepConfig(16, 8, tp, ep, etp, k) for k in (2, 4, 8)]
    return configs


# --------------------------------------------------------------------------------------------
# Rank body (runs in the spawned gloo processes)
# --------------------------------------------------------------------------------------------
def _run_job(rank: int, world_size: int, configs: list[SweepConfig]) -> list[dict]:
    """Every config × candidate on this rank; returns per-case counters and routing facts."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from monta import comm
    from monta.compat import apply_cpu_patches
    from monta.compat.warnings_filter import quiet_known_warnings
    from monta.dispatch.monta_dispatcher import DispatchOptions
    from monta.model import gpt_moe_layer_spec
    from monta.parallel import get_topology

    apply_cpu_patches()
    quiet_known_warnings()
    topology = get_topology()
    my_node = topology.node(rank)
    results = []
    layout = None
    # 1) one model-parallel init per layout: group creation dominates otherwise
    for config in sorted(configs, key=lambda c: (c.layout, c.experts, c.topk)):
        if config.layout != layout:
            if layout is not None:
                ps.destroy_model_parallel()
            ps.initialize_model_parallel(tensor_model_parallel_size=config.tp,
                                         expert_model_parallel_size=config.ep,
                                         expert_tensor_parallel_size=config.etp)
            layout = config.layout
        ep_ranks = dist.get_process_group_ranks(ps.get_expert_model_parallel_group())
        # same tokens for every candidate of this config
        x_init = torch.randn(TOKENS_PER_RANK, 1, HIDDEN,
                             generator=torch.Generator().manual_seed(SEED + 1000 * rank))
        for label, dispatcher, node_dedup in CANDIDATES:
            # 2) same router and expert weights for every candidate (same seed on all ranks)
            torch.manual_seed(SEED)
            tconf = TransformerConfig(
                num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN_HIDDEN,
                moe_ffn_hidden_size=FFN_HIDDEN, num_attention_heads=8, num_moe_experts=config.experts,
                moe_router_topk=config.topk, moe_router_pre_softmax=config.topk == 1,
                moe_router_load_balancing_type="none", moe_token_dispatcher_type=dispatcher,
                tensor_model_parallel_size=config.tp, expert_model_parallel_size=config.ep,
                expert_tensor_parallel_size=config.etp, sequence_parallel=config.tp > 1,
                gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                use_cpu_initialization=True, normalization="RMSNorm")
            tconf.monta_dispatch = DispatchOptions(node_dedup=node_dedup)
            layer = build_module(gpt_moe_layer_spec(tconf).submodules.mlp, config=tconf,
                                 pg_collection=get_default_pg_collection())
            layer.set_layer_number(1)
            seen = {}
            layer.router.register_forward_hook(
                lambda _m, _i, outputs: seen.__setitem__("map", outputs[1].detach().clone()))
            x = x_init.clone().requires_grad_(True)
            counter = comm.LinkBytes()
            with comm.count_bytes(counter):
                out, _ = layer(x)
                out.square().sum().backward()
            routing_map = seen["map"]  # [T_r, E] bool, this rank's own tokens
            results.append({
                "config": config, "label": label, "rank": rank,
                "tags": counter.by_tag(), "ep_ranks": ep_ranks,
                "routing_digest": hashlib.sha1(routing_map.numpy().tobytes()).hexdigest(),
                "predicted_inter_rows": _inter_rows_from_routing(
                    routing_map, ep_ranks, topology, my_node),
            })
            del layer, out
    ps.destroy_model_parallel()
    return results


def _inter_rows_from_routing(routing_map, ep_ranks, topology, my_node) -> dict[str, int]:
    """Inter-node rows each scheme must send for this rank's routing map (DESIGN §2, exact)."""
    import torch

    experts = routing_map.size(1)
    owner_idx = torch.arange(experts) // (experts // len(ep_ranks))  # [E] -> EP-group index
    node_of_idx = torch.tensor([topology.node(r) for r in ep_ranks])  # [R]
    remote_idx = node_of_idx != my_node  # [R]
    owner_onehot = _bool_one_hot(owner_idx, len(ep_ranks))  # [E, R]
    wants_rank = (routing_map.unsqueeze(-1) & owner_onehot.unsqueeze(0)).any(dim=1)  # [T, R]
    num_nodes = topology.num_nodes
    node_onehot = _bool_one_hot(node_of_idx[owner_idx], num_nodes)  # [E, N]
    wants_node = (routing_map.unsqueeze(-1) & node_onehot.unsqueeze(0)).any(dim=1)  # [T, N]
    wants_node[:, my_node] = False
    return {
        "per_expert": int((routing_map & remote_idx[owner_idx].unsqueeze(0)).sum()),
        "per_rank": int((wants_rank & remote_idx.unsqueeze(0)).sum()),
        "per_node": int(wants_node.sum()),
    }


def _bool_one_hot(index, classes):
    import torch

    return torch.nn.functional.one_hot(index, classes).bool()


# --------------------------------------------------------------------------------------------
# Uniform-routing expectation (pure Python)
# --------------------------------------------------------------------------------------------
def _p_hit(experts: int, topk: int, held: int) -> float:
    """P(at least one of k distinct uniform picks among E lands in a given set of ``held``)."""
    return 1.0 - math.comb(experts - held, topk) / math.comb(experts, topk)


def uniform_expectation(config: SweepConfig, ep_groups: dict[int, list[int]]) -> dict[str, float]:
    """Expected inter copies per token under uniform routing (module docstring), averaged over
    source ranks, from the real EP groups (``ep_groups[rank]``) and the emulated topology."""
    E, k = config.experts, config.topk
    node = [r // config.ranks_per_node for r in range(config.world)]
    sums = defaultdict(float)
    for src in range(config.world):
        group = ep_groups[src]
        per_rank = E // len(group)
        remote_ranks = [r for r in group if node[r] != node[src]]
        remote_nodes = {node[r] for r in remote_ranks}
        sums["alltoall"] += k * per_rank * len(remote_ranks) / E
        sums["monta/flat"] += len(remote_ranks) * _p_hit(E, k, per_rank)
        sums["monta/dedup"] += sum(
            _p_hit(E, k, per_rank * sum(node[r] == n for r in group)) for n in remote_nodes)
        n_nodes = len({node[r] for r in group})
        sums["design_approx_dedup"] += (n_nodes - 1) * (1 - (1 - 1 / n_nodes) ** k)
    out = {key: value / config.world for key, value in sums.items()}
    out["ds_tp"] = config.tp * out["monta/flat"]
    return out


# --------------------------------------------------------------------------------------------
# Aggregation, tables, JSON
# --------------------------------------------------------------------------------------------
def _is_meta(tag: str) -> bool:
    return tag.endswith("/meta") or "/meta/" in tag


def _forward_dispatch(tag: str) -> bool:
    return ((tag.startswith("layer1/dispatch/") or tag.startswith("layer1/tp_gather"))
            and not tag.endswith("/bwd"))


def aggregate(config: SweepConfig, label: str, per_rank: list[dict]) -> dict:
    """One table row: bytes summed over ranks and normalised per distinct token."""
    tags: dict[str, dict[str, int]] = defaultdict(lambda: {"intra": 0, "inter": 0})
    for facts in per_rank:
        for tag, links in facts["tags"].items():
            for link, n in links.items():
                tags[tag][link] += n
    payload = {"intra": 0, "inter": 0}
    meta = {"intra": 0, "inter": 0}
    tp_gather = 0
    for tag, links in tags.items():
        if not _forward_dispatch(tag):
            continue
        target = meta if _is_meta(tag) else payload
        for link in target:
            target[link] += links[link]
        if tag == "layer1/tp_gather":
            tp_gather += links["intra"] + links["inter"]
    tokens = config.world * TOKENS_PER_RANK
    row_bytes = HIDDEN * BYTES_PER_ELEMENT
    predicted_rows = sum(
        facts["predicted_inter_rows"][{"alltoall": "per_expert", "monta/dedup": "per_node"}
                                      .get(label, "per_rank")] for facts in per_rank)
    if label == "ds_tp":
        predicted_rows *= config.tp
    return {
        "config": dataclasses.asdict(config) | {"nodes": config.nodes, "name": config.name},
        "dispatcher": label,
        "distinct_tokens": tokens,
        "inter_bytes": payload["inter"],
        "intra_bytes": payload["intra"],
        "tp_gather_bytes": tp_gather,
        "meta_bytes": meta,
        "inter_copies_per_token": payload["inter"] / (tokens * row_bytes),
        "intra_copies_per_token": payload["intra"] / (tokens * row_bytes),
        "tp_gather_copies_per_token": tp_gather / (tokens * row_bytes),
        "meta_bytes_per_token": (meta["intra"] + meta["inter"]) / tokens,
        "routing_predicted_inter_bytes": predicted_rows * row_bytes,
        "routing_check": predicted_rows * row_bytes == payload["inter"],
        "routing_digest": hashlib.sha1(
            "".join(f["routing_digest"] for f in per_rank).encode()).hexdigest()[:12],
        "tags": dict(sorted(tags.items())),
    }


def build_rows(configs: list[SweepConfig], raw: list[dict]) -> list[dict]:
    by_case: dict[tuple, list[dict]] = defaultdict(list)
    for facts in raw:
        by_case[(facts["config"], facts["label"])].append(facts)
    rows = []
    for config in configs:
        cases = {label: sorted(by_case[(config, label)], key=lambda f: f["rank"])
                 for label, _, _ in CANDIDATES}
        ep_groups = {f["rank"]: f["ep_ranks"] for f in cases["monta/flat"]}
        expect = uniform_expectation(config, ep_groups)
        config_rows = {label: aggregate(config, label, facts) for label, facts in cases.items()}
        digests = {row["routing_digest"] for row in config_rows.values()}
        for label, row in config_rows.items():
            row["uniform_inter_copies_per_token"] = expect[label]
            row["design_approx_inter"] = (expect["design_approx_dedup"]
                                          if label == "monta/dedup" else None)
            row["same_routing_as_others"] = len(digests) == 1
            for base in ("monta/flat", "monta/dedup"):
                denom = config_rows[base]["inter_bytes"]
                row[f"inter_over_{base.replace('/', '_')}"] = (
                    row["inter_bytes"] / denom if denom else None)
            rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], meta: dict) -> str:
    from bench.harness import provenance_line

    lines = [
        "# Forward dispatch bytes per distinct token (copies of a token's hidden state)",
        "",
        provenance_line(meta),
        "",
        f"T_r = {TOKENS_PER_RANK} tokens per rank (SP shard), hidden {HIDDEN}, fp32; copies = "
        "bytes summed over ranks / (world · T_r · hidden · 4). *uniform* = uniform-routing "
        "expectation of inter copies (bench/dispatch_bytes.py docstring); measured values use "
        "the random router. *intra* includes *TP gather* (ds_tp's pre-dispatch all-gather). "
        "*meta* = router probs + masks, bytes per token. *check* = counters equal the inter "
        "bytes predicted from the realised routing maps.",
        "",
        "| config | dispatcher | inter | uniform | intra | TP gather | meta B/tok | "
        "÷ monta/flat | ÷ monta/dedup | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']['name']} | {row['dispatcher']} "
            f"| {_fmt(row['inter_copies_per_token'])} "
            f"| {_fmt(row['uniform_inter_copies_per_token'])} "
            f"| {_fmt(row['intra_copies_per_token'])} "
            f"| {_fmt(row['tp_gather_copies_per_token'], 2)} "
            f"| {_fmt(row['meta_bytes_per_token'], 1)} "
            f"| {_fmt(row['inter_over_monta_flat'], 2)} "
            f"| {_fmt(row['inter_over_monta_dedup'], 2)} "
            f"| {'✓' if row['routing_check'] and row['same_routing_as_others'] else '✗'} |")
    lines += ["", "## Inter-node byte ratios", "",
              "| config | alltoall ÷ monta/flat | alltoall ÷ monta/dedup | ds_tp ÷ monta/flat | "
              "ds_tp ÷ monta/dedup |", "|---|---:|---:|---:|---:|"]
    by_config: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_config[row["config"]["name"]][row["dispatcher"]] = row
    for name, cands in by_config.items():
        lines.append(
            f"| {name} | {_fmt(cands['alltoall']['inter_over_monta_flat'], 2)} "
            f"| {_fmt(cands['alltoall']['inter_over_monta_dedup'], 2)} "
            f"| {_fmt(cands['ds_tp']['inter_over_monta_flat'], 2)} "
            f"| {_fmt(cands['ds_tp']['inter_over_monta_dedup'], 2)} |")
    return "\n".join(lines) + "\n"


def run_meta(args: argparse.Namespace) -> dict:
    from bench.harness import machine
    from monta.provenance import source_commit, source_dirty

    return {
        "benchmark": "dispatch_bytes",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": source_commit(),
        "git_dirty": source_dirty(),
        "machine": machine(),
        "settings": {"quick": args.quick, "tokens_per_rank": TOKENS_PER_RANK, "hidden": HIDDEN,
                     "ffn_hidden": FFN_HIDDEN, "bytes_per_element": BYTES_PER_ELEMENT,
                     "dtype": "fp32", "seed": SEED,
                     "candidates": [dict(zip(("label", "dispatcher", "node_dedup"), c))
                                    for c in CANDIDATES]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="world-4 configs only (smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON path; the Markdown table goes next to it (.md)")
    args = parser.parse_args(argv)

    from monta.testing import run_distributed

    configs = sweep(args.quick)
    jobs: dict[tuple[int, int], list[SweepConfig]] = defaultdict(list)
    for config in configs:
        jobs[(config.world, config.ranks_per_node)].append(config)
    start = time.perf_counter()
    raw, job_seconds = [], {}
    for (world, per_node), job_configs in jobs.items():
        t0 = time.perf_counter()
        print(f"[dispatch_bytes] {world} ranks as {world // per_node} nodes x {per_node}: "
              f"{len(job_configs)} configs x {len(CANDIDATES)} dispatchers", flush=True)
        results = run_distributed(_run_job, world, job_configs, timeout_s=JOB_TIMEOUT_S,
                                  env={"MONTA_RANKS_PER_NODE": str(per_node)})
        raw += [facts for rank_results in results for facts in rank_results]
        job_seconds[f"{world // per_node}x{per_node}"] = round(time.perf_counter() - t0, 1)
    meta = run_meta(args)
    meta["wall_seconds"] = {"total": round(time.perf_counter() - start, 1), "jobs": job_seconds}
    rows = build_rows(configs, raw)
    table = markdown(rows, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(meta | {"rows": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"[dispatch_bytes] wrote {args.out} and {args.out.with_suffix('.md')} "
          f"in {meta['wall_seconds']['total']} s", flush=True)
    bad = [f"{r['config']['name']} {r['dispatcher']}" for r in rows
           if not (r["routing_check"] and r["same_routing_as_others"])]
    if bad:
        print(f"[dispatch_bytes] counters disagree with the routing maps for: {bad}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Re-import under the package name so spawned ranks unpickle _run_job and SweepConfig by an
    # importable module path rather than __main__.
    sys.path.insert(0, str(REPO))
    from bench.dispatch_bytes import main as _main

    sys.exit(_main())
