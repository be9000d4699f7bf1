"""Byte counters equal DESIGN §2's formulas exactly, for the routings that actually happened.

4 gloo ranks as 2 emulated nodes × 2 ranks. Each case builds one MoE layer, runs forward and
backward, and brings back every rank's routing map, EP group and per-tag counters; this process
recomputes the expected bytes from the routing maps alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from monta.testing import run_distributed

HIDDEN, TOKENS_PER_RANK, BYTES = 32, 24, 4  # fp32
RANKS_PER_NODE = 2


@dataclasses.dataclass(frozen=True)
class ByteCase:
    dispatcher: str
    tp: int
    ep: int
    topk: int
    experts: int = 8
    node_dedup: str = "off"
    seed: int = 0


def _run_cases(rank, world_size, cases):
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from monta import comm
    from monta.compat import apply_cpu_patches
    from monta.dispatch.monta_dispatcher import DispatchOptions
    from monta.model import gpt_moe_layer_spec

    apply_cpu_patches()
    results = []
    for case in cases:
        ps.initialize_model_parallel(tensor_model_parallel_size=case.tp,
                                     expert_model_parallel_size=case.ep)
        torch.manual_seed(case.seed)
        config = TransformerConfig(
            num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=16, num_attention_heads=4,
            num_moe_experts=case.experts, moe_router_topk=case.topk,
            moe_router_pre_softmax=case.topk == 1, moe_router_load_balancing_type="none",
            moe_token_dispatcher_type=case.dispatcher, tensor_model_parallel_size=case.tp,
            expert_model_parallel_size=case.ep, sequence_parallel=case.tp > 1,
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            use_cpu_initialization=True, normalization="RMSNorm")
        config.monta_dispatch = DispatchOptions(node_dedup=case.node_dedup)
        layer = build_module(gpt_moe_layer_spec(config).submodules.mlp, config=config,
                             pg_collection=get_default_pg_collection())
        layer.set_layer_number(1)
        seen = {}
        def keep_routing_map(_module, _inputs, outputs):
            seen["map"] = outputs[1].clone()

        layer.router.register_forward_hook(keep_routing_map)
        x = torch.randn(TOKENS_PER_RANK, 1, HIDDEN,
                        generator=torch.Generator().manual_seed(100 * case.seed + rank),
                        requires_grad=True)
        counter = comm.LinkBytes()
        with comm.count_bytes(counter):
            out, _ = layer(x)
            out.square().sum().backward()
        ep_ranks = dist.get_process_group_ranks(ps.get_expert_model_parallel_group())
        mine = {"map": seen["map"], "ep_ranks": ep_ranks, "tags": counter.by_tag(),
                "tp_rank": ps.get_tensor_model_parallel_rank()}
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        results.append(everyone)
        ps.destroy_model_parallel()
    return results if rank == 0 else None


def _node(rank: int) -> int:
    return rank // RANKS_PER_NODE


def _owner(ep_ranks, expert, experts):
    return ep_ranks[expert // (experts // len(ep_ranks))]


def expected_bytes(case: ByteCase, ranks: list[dict]) -> dict[str, int]:
    """Payload bytes the forward dispatch sends, from the routing maps (DESIGN §2)."""
    totals = {"intra": 0, "inter": 0}
    row = HIDDEN * BYTES
    for src, facts in enumerate(ranks):
        mask = facts["map"]
        for t in range(mask.size(0)):
            experts = torch.nonzero(mask[t]).flatten().tolist()
            owners = [_owner(facts["ep_ranks"], e, case.experts) for e in experts]
            if case.dispatcher == "alltoall":  # one copy per (token, expert)
                targets = owners
            elif case.node_dedup == "on":  # one copy per (token, remote node) + fan-out
                remote = {_node(o) for o in owners} - {_node(src)}
                totals["inter"] += len(remote) * row
                # intra: local owners other than me, plus, at each gateway, the other owners
                local = {o for o in owners if _node(o) == _node(src)} - {src}
                totals["intra"] += len(local) * row
                for node in remote:
                    on_node = sorted({(e, o) for e, o in zip(experts, owners) if _node(o) == node})
                    gateway = on_node[0][1]
                    totals["intra"] += len({o for _, o in on_node} - {gateway}) * row
                continue
            else:  # flat monta / ds_tp: one copy per (token, owner rank)
                targets = sorted(set(owners))
            for g in targets:
                if g != src:
                    totals["inter" if _node(g) != _node(src) else "intra"] += row
    return totals


def measured(ranks: list[dict], prefix: str) -> dict[str, int]:
    totals = {"intra": 0, "inter": 0}
    for facts in ranks:
        for tag, links in facts["tags"].items():
            if tag.startswith(prefix) and not tag.endswith(("/meta", "/bwd")) and \
                    "/meta/" not in tag:
                for link in totals:
                    totals[link] += links[link]
    return totals


FLAT_CASES = [ByteCase("alltoall", 1, 4, k, seed=k) for k in (1, 2, 4, 8)] + \
    [ByteCase("monta", 1, 4, k, node_dedup="off", seed=k) for k in (1, 2, 4, 8)] + \
    [ByteCase("monta", 1, 4, k, node_dedup="on", seed=k) for k in (1, 2, 4, 8)]
TP_CASES = [ByteCase("monta", 2, 2, k, node_dedup="off", seed=10 + k) for k in (2, 4)] + \
    [ByteCase("ds_tp", 2, 2, k, seed=10 + k) for k in (2, 4)] + \
    [ByteCase("alltoall", 2, 2, 4, seed=14)]


@pytest.fixture(scope="module")
def measured_cases():
    cases = FLAT_CASES + TP_CASES
    results = run_distributed(_run_cases, 4, cases, timeout_s=300,
                              env={"MONTA_RANKS_PER_NODE": str(RANKS_PER_NODE)})[0]
    return dict(zip(cases, results))


@pytest.mark.parametrize("case", FLAT_CASES, ids=lambda c: f"{c.dispatcher}-dedup{c.node_dedup}"
                         f"-top{c.topk}")
def test_dispatch_bytes_match_formula(case, measured_cases):
    ranks = measured_cases[case]
    want = expected_bytes(case, ranks)
    got = measured(ranks, "layer1/dispatch/")
    assert got == want
    assert want["inter"] > 0
    # combine returns exactly what dispatch sent, and backward mirrors both
    assert measured(ranks, "layer1/combine/") == got
    bwd = {"intra": 0, "inter": 0}
    for facts in ranks:
        for tag, links in facts["tags"].items():
            if tag.startswith("layer1/dispatch/") and tag.endswith("/bwd") and "/meta" not in tag:
                for link in bwd:
                    bwd[link] += links[link]
    assert bwd == got


def test_node_dedup_sends_each_token_once_per_remote_node(measured_cases):
    """inter bytes = #distinct (token, remote node) pairs × h × b, and fewer than flat's."""
    for k in (2, 4, 8):
        dedup = measured_cases[ByteCase("monta", 1, 4, k, node_dedup="on", seed=k)]
        pairs = 0
        for src, facts in enumerate(dedup):
            for t in range(facts["map"].size(0)):
                owners = {_owner(facts["ep_ranks"], e, 8) for e in
                          torch.nonzero(facts["map"][t]).flatten().tolist()}
                pairs += len({_node(o) for o in owners} - {_node(src)})
        assert measured(dedup, "layer1/dispatch/")["inter"] == pairs * HIDDEN * BYTES
        stock = measured(measured_cases[ByteCase("alltoall", 1, 4, k, seed=k)],
                         "layer1/dispatch/")
        assert measured(dedup, "layer1/dispatch/")["inter"] < stock["inter"]


@pytest.mark.parametrize("topk", [2, 4])
def test_ds_tp_sends_tp_times_the_tp_sharded_bytes(topk, measured_cases):
    sharded = measured(measured_cases[ByteCase("monta", 2, 2, topk, node_dedup="off",
                                               seed=10 + topk)], "layer1/dispatch/flat")
    replicated = measured(measured_cases[ByteCase("ds_tp", 2, 2, topk, seed=10 + topk)],
                          "layer1/dispatch/flat")
    assert sharded["inter"] > 0
    assert replicated["inter"] == 2 * sharded["inter"]  # TP = 2


@pytest.mark.parametrize("dispatcher", ["alltoall", "monta"])
def test_expert_tp_backward_mirrors_forward(dispatcher, measured_cases):
    """TP2·EP2·ETP2: the expert-TP all-gather's backward (a reduce-scatter) and the
    reduce-scatter's backward (an all-gather) send exactly the forward's bytes, and are counted
    for megatron's stock dispatcher too (its collectives run inside megatron)."""
    ranks = measured_cases[ByteCase(dispatcher, 2, 2, 4, node_dedup="off", seed=14)
                           if dispatcher == "monta" else ByteCase("alltoall", 2, 2, 4, seed=14)]

    def total(tag_suffix: str) -> int:
        return sum(links["intra"] + links["inter"] for facts in ranks
                   for tag, links in facts["tags"].items() if tag.endswith(tag_suffix))

    for phase in ("dispatch/etp_gather", "combine/etp_reduce"):
        assert total(phase) > 0, phase
        assert total(phase + "/bwd") == total(phase), phase
