"""Rank body of ``bench/moe_ab.py``: every MoE-layer case of one inter-node cap in ONE job.

    python -m monta.testbed --nodes 2 --ranks-per-node 2 --inter-gbit 1 -- \\
        python -m bench.moe_ab_worker --config /tmp/cfg.json --out /tmp/cap1.json

``--config`` is the JSON written by ``bench/moe_ab.py`` (:func:`bench.moe_ab.worker_config`):
layouts, top-k values, candidates, sizes, repetitions. Rank 0 writes every case's timings and
byte counters to ``--out`` (a results file, so nothing is parsed from the prefixed output).

Per parallel layout (one ``initialize_model_parallel`` each):

  1) build one megatron-core MoE layer (:class:`monta.dispatch.MoNTAMoELayer`) per (top-k,
     candidate), all from the same seed (same router and expert weights, so the same routing),
     plus a *no-comm* reference per top-k: the same layer with EP = TP = 1 on single-rank
     process groups (all E experts local, megatron's stock permutation, no collective);
  2) one untimed warm-up pass per case, inside ``comm.count_bytes``: the byte counters
     (deterministic for a fixed routing) and the routing digest;
  3) ``reps`` rounds; each round runs every case once (interleaved, the start rotated by one
     case per round) as forward + backward of the layer on the same input and output gradient.
     A case's time is max(end) − min(start) over all ranks after a barrier; the forward
     dispatch/combine phase seconds of :mod:`monta.dispatch.stats` are kept beside it (max over
     ranks).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def _singleton_pg_collection(rank: int, world: int):
    """Process groups of one rank for every role (all ranks create all of them, in order)."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    mine = None
    for r in range(world):
        group = dist.new_group([r])
        if r == rank:
            mine = group
    pgc = ProcessGroupCollection()
    for role in ("ep", "tp", "cp", "expt_tp", "expt_dp", "tp_ep", "tp_cp", "tp_dp_cp"):
        setattr(pgc, role, mine)
    return pgc


def _build_layer(cfg: dict, layout: dict, topk: int, cand: dict, pg_collection):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from monta.dispatch.monta_dispatcher import DispatchOptions
    from monta.model import gpt_moe_layer_spec

    nocomm = cand["dispatcher"] == "nocomm"
    tp, ep, etp = (1, 1, 1) if nocomm else (layout["tp"], layout["ep"], layout["etp"])
    torch.manual_seed(cfg["seed"])  # same weights (router included) for every candidate
    tconf = TransformerConfig(
        num_layers=1, hidden_size=cfg["hidden"], ffn_hidden_size=cfg["ffn_hidden"],
        moe_ffn_hidden_size=cfg["ffn_hidden"], num_attention_heads=8,
        num_moe_experts=cfg["experts"], moe_router_topk=topk, moe_router_pre_softmax=topk == 1,
        moe_router_load_balancing_type="none",
        moe_token_dispatcher_type="alltoall" if nocomm else cand["dispatcher"],
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp, sequence_parallel=tp > 1, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
        normalization="RMSNorm")
    if cand["dispatcher"] == "monta":
        tconf.monta_dispatch = DispatchOptions(tp_shard=True, node_dedup=cand["node_dedup"],
                                               chunks=cand["chunks"])
    layer = build_module(gpt_moe_layer_spec(tconf).submodules.mlp, config=tconf,
                         pg_collection=pg_collection)
    layer.set_layer_number(1)
    return layer


class _Case:
    def __init__(self, layout: dict, topk: int, cand: dict, layer):
        self.layout, self.topk, self.cand, self.layer = layout, topk, cand, layer
        self.times: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.tags: dict[str, dict[str, int]] = {}
        self.routing_digest = ""
        self.tuned: str | None = None

    @property
    def key(self) -> str:
        return f"{self.layout['name']}|top{self.topk}|{self.cand['label']}"


def _run_layout(cfg: dict, layout: dict, rank: int, world: int, single_pgc) -> list[dict]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from monta import comm
    from monta.dispatch.stats import take_phase_seconds

    ps.initialize_model_parallel(tensor_model_parallel_size=layout["tp"],
                                 expert_model_parallel_size=layout["ep"],
                                 expert_tensor_parallel_size=layout["etp"])
    pgc = get_default_pg_collection()
    cases: list[_Case] = []
    for topk in cfg["topks"]:
        for cand in [{"label": "nocomm", "dispatcher": "nocomm"}, *layout["candidates"]]:
            layer = _build_layer(cfg, layout, topk, cand,
                                 single_pgc if cand["dispatcher"] == "nocomm" else pgc)
            cases.append(_Case(layout, topk, cand, layer))
    gen = torch.Generator().manual_seed(cfg["seed"] + 1000 * rank)  # distinct tokens per rank
    x_init = torch.randn(cfg["tokens_per_rank"], 1, cfg["hidden"], generator=gen)
    grad_out = torch.randn(cfg["tokens_per_rank"], 1, cfg["hidden"], generator=gen)

    def step(case: _Case) -> None:
        for p in case.layer.parameters():
            p.grad = None
        x = x_init.clone().requires_grad_(True)
        out, _ = case.layer(x)
        out.backward(grad_out)

    def timed(case: _Case) -> tuple[float, dict[str, float]]:
        take_phase_seconds()
        span = torch.tensor([-math.inf, -math.inf], dtype=torch.float64)
        dist.barrier()
        start = time.perf_counter()
        step(case)
        span[0], span[1] = -start, time.perf_counter()
        phases = take_phase_seconds()
        fwd = torch.tensor([sum(v for k, v in phases.items() if k.endswith("/dispatch")),
                            sum(v for k, v in phases.items() if k.endswith("/combine"))],
                           dtype=torch.float64)
        both = torch.cat([span, fwd])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return (both[0] + both[1]).item(), {"fwd_dispatch_s": both[2].item(),
                                           "fwd_combine_s": both[3].item()}

    # 2) warm-up with counters and the routing each case saw; a tuning candidate first runs
    #    its trial forwards (every rank the same number), so what is timed is its pick
    for case in cases:
        tuner = getattr(case.layer.token_dispatcher, "tuner", None)
        while tuner is not None and tuner.chosen is None:
            step(case)
        seen: dict[str, Any] = {}
        hook = case.layer.router.register_forward_hook(
            lambda _m, _i, outputs: seen.__setitem__("map", outputs[1].detach().clone()))
        counter = comm.LinkBytes()
        dist.barrier()
        with comm.count_bytes(counter):
            step(case)
        hook.remove()
        take_phase_seconds()
        case.tags = counter.by_tag()
        case.tuned = str(tuner.chosen) if tuner is not None and len(tuner.candidates) > 1 else None
        case.routing_digest = hashlib.sha1(seen["map"].numpy().tobytes()).hexdigest()
    if rank == 0:
        print(f"[moe_ab] {layout['name']}: {len(cases)} cases warmed up", flush=True)
    # 3) interleaved repetitions, the start rotated every round
    for rep in range(cfg["reps"]):
        t0 = time.perf_counter()
        for i in range(len(cases)):
            case = cases[(i + rep) % len(cases)]
            seconds, phases = timed(case)
            case.times.append(seconds)
            case.phases.append(phases)
        if rank == 0:
            print(f"[moe_ab] {layout['name']}: round {rep + 1}/{cfg['reps']} "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)

    # per-rank counters and digests to rank 0
    mine = [{"key": c.key, "tags": c.tags, "digest": c.routing_digest} for c in cases]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    rows = []
    for i, case in enumerate(cases):
        tags: dict[str, dict[str, int]] = {}
        for per_rank in everyone:
            for tag, links in per_rank[i]["tags"].items():
                slot = tags.setdefault(tag, {"intra": 0, "inter": 0})
                for link, n in links.items():
                    slot[link] += n
        rows.append({
            "layout": {k: layout[k] for k in ("name", "tp", "ep", "etp")},
            "topk": case.topk, "candidate": case.cand, "times_s": case.times, "tuned": case.tuned,
            "phases": case.phases, "tags": tags,
            "routing_digest": hashlib.sha1(
                "".join(r[i]["digest"] for r in everyone).encode()).hexdigest()[:12],
        })
    for case in cases:
        del case.layer
    ps.destroy_model_parallel()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="JSON written by bench/moe_ab.py")
    parser.add_argument("--out", required=True, help="rank 0 writes the results here (JSON)")
    args = parser.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text())

    import torch
    import torch.distributed as dist

    from monta.compat import apply_cpu_patches
    from monta.compat.warnings_filter import quiet_known_warnings
    from monta.parallel import set_topology
    from monta.topology import detect_topology

    quiet_known_warnings()
    apply_cpu_patches()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg["pg_timeout_s"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    set_topology(detect_topology())
    single = _singleton_pg_collection(rank, world)
    started = time.perf_counter()
    rows = []
    for layout in cfg["layouts"]:
        rows += _run_layout(cfg, layout, rank, world, single)
    if rank == 0:
        Path(args.out).write_text(json.dumps(
            {"rows": rows, "world_size": world, "worker_seconds": time.perf_counter() - started},
            indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
