"""Rank body of ``bench/multigpu.sh``: NCCL correctness of every dispatcher against the dense
reference, then the paper's dispatch+combine comparison at Mixtral shapes. Any number of GPUs
(or CPU ranks with gloo, for a dry run of the same code)::

    torchrun --nproc-per-node 8 bench/multigpu_worker.py --ranks-per-node 4 --out r.json
    torchrun --nproc-per-node 4 bench/multigpu_worker.py --ranks-per-node 2 --tiny --out r.json

``--ranks-per-node G`` declares emulated nodes of G consecutive ranks (one host's GPUs split
into two "nodes"), so node dedup and the intra/inter byte counters have two link classes.

1) correctness: per layout valid for the world size (TP=W·EP=W; TP2·EP=W/2; TP1·EP=W;
   TP2·EP=W/2·ETP2), routing cases (top-1/2/4, capacity drop, all tokens to one EP rank) ×
   dispatchers (stock ``alltoall``, ``monta`` flat/dedup × 1/4 chunks, ``ds_tp``) × fp32/bf16;
   rank 0 compares outputs and every gradient: fp32 with :mod:`monta.testing.moe_reference`
   (tolerance 1e-5: only summation order differs); bf16 with megatron's own bf16 result (stock
   ``alltoall``, same run) at 1e-2 relative error — against fp32, bf16 rounding flips near-tied
   top-k choices, so no bf16 implementation matches it elementwise;
2) dispatch + combine: one MoE layer forward + backward per candidate at Mixtral-8x7B shapes
   (h 4096, ffn 14336, 8 experts, bf16), ``--seq`` tokens per TP group: TP=W ``ds_tp`` vs
   ``monta``; TP1·EP=W stock ``alltoall`` vs ``monta`` at top-k 2/4/8. Each candidate's time is
   the median over ``--reps`` of max-over-ranks CUDA-synchronised wall time; *comm* = layer − the
   same layer with EP = TP = 1 (all experts local, no collectives). Bytes from monta.comm.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

MIXTRAL = {"hidden": 4096, "ffn": 14336, "experts": 8}
TINY = {"hidden": 64, "ffn": 128, "experts": 8}


def layouts_for(world: int) -> list[tuple[int, int, int]]:
    """(TP, EP, ETP) of part 1, deduplicated, valid for ``world`` ranks and 8 experts."""
    wanted = [(world, world, 1), (2, world // 2, 1), (1, world, 1), (2, world // 2, 2)]
    out = []
    for tp, ep, etp in wanted:
        ok = (tp >= 1 and ep >= 1 and world % tp == 0 and world % (ep * etp) == 0
              and 8 % ep == 0 and (tp, ep, etp) not in out
              and (ep > 1 or etp > 1 or world == 1))  # no expert parallelism: nothing to test
        if ok:
            out.append((tp, ep, etp))
    return out


def correctness(world: int, ranks_per_node: int, dtypes: list[str]) -> list[dict]:
    import torch
    import torch.distributed as dist

    from monta.dispatch.monta_dispatcher import DispatchOptions
    from monta.testing.moe_layer_check import (
        MoECase,
        MoELayout,
        MoEShape,
        check_against_reference,
        run_mixed_cases,
    )

    cases = [MoECase("top1", topk=1, pre_softmax=True, seed=1), MoECase("top2", topk=2, seed=2),
             MoECase("top4", topk=4, seed=3),
             MoECase("top2-cf0.5-drop", topk=2, capacity_factor=0.5, seed=6),
             MoECase("all-to-experts01-top2", topk=2, hot_experts=(0, 1), seed=11)]
    monta = [("monta", DispatchOptions(node_dedup=d, chunks=c))
             for d, c in (("off", 1), ("on", 1), ("off", 4), ("on", 4))]
    rows = []
    for tp, ep, etp in layouts_for(world):
        layout = MoELayout(tp, ep, etp, world_size=world)
        dispatchers = ["alltoall", *monta] + (["ds_tp"] if etp in (1, tp) else [])
        for dtype_name in dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            shape = MoEShape(num_experts=8, hidden_size=32, ffn_hidden_size=16 * etp,
                             seq_per_shard=8, micro_batch_size=2, dtype=dtype)
            items = [(case, shape, d, ranks_per_node) for d in dispatchers for case in cases]
            started = time.perf_counter()
            results = run_mixed_cases(dist.get_rank(), world, layout, items)
            if dist.get_rank() != 0:
                continue
            stock = {got["case"].name: got for got in results if got["dispatcher"] == "alltoall"}
            for got in results:
                name = got["dispatcher"]
                label = (name if isinstance(name, str) else
                         f"monta/{'dedup' if name[1].node_dedup == 'on' else 'flat'}"
                         f"/c{name[1].chunks}")
                row = {"layout": layout.name, "dtype": dtype_name, "dispatcher": label,
                       "case": got["case"].name}
                try:
                    row["tensors_compared"] = (
                        check_against_reference(layout, got, shape, require_drops=False)
                        if dtype == torch.float32 else _same_as(got, stock[got["case"].name]))
                    row["ok"] = True
                except AssertionError as exc:
                    row.update(ok=False, error=str(exc)[:500])
                rows.append(row)
            print(f"[multigpu] correctness {layout.name} {dtype_name}: {len(items)} cases "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
    return rows


def _same_as(got: dict, stock: dict, tol: float = 1e-2) -> int:
    """bf16: outputs and every gradient within ``tol`` relative (Frobenius) error of megatron's
    stock bf16 result. Relative-norm, not elementwise: without megatron's fp32 main grads a
    chunked layer sums its weight gradients in bf16, and a near-cancelled element can move by
    several ulps while the tensor agrees to 1e-3."""

    pairs = {"output": (got["output"], stock["output"]),
             "input grad": (got["input_grad"], stock["input_grad"]),
             "router grad": (got["grads"].router, stock["grads"].router),
             "fc1 grads": (got["grads"].fc1, stock["grads"].fc1),
             "fc2 grads": (got["grads"].fc2, stock["grads"].fc2)}
    for name, (actual, expected) in pairs.items():
        error = float((actual - expected).norm() / expected.norm().clamp_min(1e-12))
        assert error <= tol, f"{got['case'].name}: {name}: relative error {error:.2e} > {tol}"
    return len(pairs)


def _layer(sizes: dict, tp: int, ep: int, topk: int, dispatcher: str, options, pgc, seed: int):
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from monta.model import gpt_moe_layer_spec

    on_gpu = torch.cuda.is_available()
    torch.manual_seed(seed)
    if on_gpu:
        model_parallel_cuda_manual_seed(seed)
    config = TransformerConfig(
        num_layers=1, hidden_size=sizes["hidden"], ffn_hidden_size=sizes["ffn"],
        moe_ffn_hidden_size=sizes["ffn"], num_attention_heads=32,
        num_moe_experts=sizes["experts"], moe_router_topk=topk,
        moe_router_load_balancing_type="none", moe_token_dispatcher_type=dispatcher,
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        sequence_parallel=tp > 1, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, bias_activation_fusion=False, normalization="RMSNorm",
        use_cpu_initialization=not on_gpu, bf16=on_gpu,
        params_dtype=torch.bfloat16 if on_gpu else torch.float32)
    if options is not None:
        config.monta_dispatch = options
    layer = build_module(gpt_moe_layer_spec(config).submodules.mlp, config=config,
                         pg_collection=pgc)
    layer.set_layer_number(1)
    return layer.to("cuda" if on_gpu else "cpu")


def dispatch_combine(world: int, topology, sizes: dict, seq: int, topks: list[int],
                     reps: int) -> list:
    """Part 2 (module docstring): rows of timings and bytes, on rank 0."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from bench.moe_ab_worker import _singleton_pg_collection
    from monta import comm
    from monta.dispatch.monta_dispatcher import DispatchOptions
    from monta.parallel import set_topology

    set_topology(topology)  # part 1 leaves none set
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    single = _singleton_pg_collection(rank, world)
    monta = lambda d, c: ("monta", DispatchOptions(node_dedup=d, chunks=c))  # noqa: E731
    studies = [  # (name, TP, EP, top-k values, candidates)
        (f"TP{world}·EP{world}", world, world, [2],
         [("ds_tp", None), monta("off", 1), monta("off", 4)]),
        (f"TP1·EP{world}", 1, world, topks,
         [("alltoall", None), monta("off", 1), monta("on", 1), monta("off", 4), monta("on", 4),
          monta("tune", "tune")]),
    ]
    rows = []
    for name, tp, ep, study_topks, candidates in studies:
        if tp > 1 and world == 1:
            continue
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                     expert_tensor_parallel_size=1)
        pgc = get_default_pg_collection()
        tokens = seq // tp
        gen = torch.Generator().manual_seed(1000 + rank)
        x0 = torch.randn(tokens, 1, sizes["hidden"], generator=gen).to(device, dtype)
        g0 = torch.randn(tokens, 1, sizes["hidden"], generator=gen).to(device, dtype)
        for topk in study_topks:
            for label, options in [("nocomm", None), *candidates]:
                is_nocomm = label == "nocomm"
                layer = _layer(sizes, 1 if is_nocomm else tp, 1 if is_nocomm else ep, topk,
                               "alltoall" if is_nocomm else label, options,
                               single if is_nocomm else pgc, seed=7)
                tag = label if options is None else \
                    f"monta/{options.node_dedup}/c{options.chunks}"

                def step():
                    x = x0.clone().requires_grad_(True)
                    out, _ = layer(x)
                    out.backward(g0)

                tuner = getattr(layer.token_dispatcher, "tuner", None)
                while tuner is not None and tuner.chosen is None:
                    step()
                counter = comm.LinkBytes()
                with comm.count_bytes(counter):
                    step()
                times = []
                for _ in range(reps):
                    dist.barrier()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    span = torch.tensor([time.perf_counter() - start], device=device)
                    dist.all_reduce(span, op=dist.ReduceOp.MAX)
                    times.append(span.item())
                links = torch.tensor([counter.by_link().get(k, 0) for k in ("intra", "inter")],
                                     dtype=torch.float64, device=device)
                dist.all_reduce(links)
                rows.append({"study": name, "topk": topk, "candidate": tag,
                             "tuned": str(tuner.chosen) if tuner is not None
                             and len(tuner.candidates) > 1 else None,
                             "layer_ms": statistics.median(times) * 1e3,
                             "samples_ms": [t * 1e3 for t in times],
                             "intra_MB": links[0].item() / 1e6,
                             "inter_MB": links[1].item() / 1e6})
                if rank == 0:
                    print(f"[multigpu] {name} top-{topk} {tag}: {rows[-1]['layer_ms']:.2f} ms",
                          flush=True)
                del layer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        ps.destroy_model_parallel()
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """comm = layer − nocomm; speedups vs the study's baseline (its first real candidate)."""
    by_case: dict[tuple, list[dict]] = {}
    for row in rows:
        by_case.setdefault((row["study"], row["topk"]), []).append(row)
    for group in by_case.values():
        nocomm = next(r for r in group if r["candidate"] == "nocomm")["layer_ms"]
        base = next(r for r in group if r["candidate"] != "nocomm")
        for row in group:
            row["comm_ms"] = row["layer_ms"] - nocomm
            row["baseline"] = base["candidate"]
            row["layer_speedup"] = base["layer_ms"] / row["layer_ms"]
            row["comm_speedup"] = (base["layer_ms"] - nocomm) / row["comm_ms"] \
                if row["comm_ms"] > 0 and base["layer_ms"] > nocomm else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="rank 0 writes the results here (JSON)")
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="emulated node size (default: torchrun's LOCAL_WORLD_SIZE)")
    parser.add_argument("--parts", default="correctness,dispatch",
                        help="comma-separated: correctness, dispatch")
    parser.add_argument("--dtypes", default="fp32,bf16", help="correctness dtypes")
    parser.add_argument("--seq", type=int, default=8192, help="tokens per TP group (part 2)")
    parser.add_argument("--topks", default="2,4,8")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true",
                        help="part 2 at hidden 64 / ffn 128 (a CPU dry run of the code path)")
    parser.add_argument("--timeout-min", type=float, default=10.0,
                        help="collective timeout: a hung rank fails the run instead of waiting")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from monta.compat import apply_cpu_patches
    from monta.compat.warnings_filter import quiet_known_warnings
    from monta.parallel import set_topology
    from monta.topology import detect_topology

    quiet_known_warnings()
    apply_cpu_patches()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if on_gpu else "gloo",
                            timeout=datetime.timedelta(minutes=args.timeout_min))
    rank, world = dist.get_rank(), dist.get_world_size()
    topology = detect_topology(args.ranks_per_node)
    set_topology(topology)
    parts = set(args.parts.split(","))
    from bench.multigpu_report import measured_peak_tflops

    peak, peak_how = measured_peak_tflops() if rank == 0 else (None, None)
    result = {"world_size": world, "topology": str(topology),
              "device": torch.cuda.get_device_name() if on_gpu else "cpu",
              "backend": dist.get_backend(), "torch": torch.__version__, "parts": sorted(parts),
              "peak_tflops_measured": peak, "peak_measured_with": peak_how}
    status = 0
    try:
        if "correctness" in parts:
            result["correctness"] = correctness(world, topology.ranks_per_node,
                                                args.dtypes.split(","))
        if "dispatch" in parts:
            result["dispatch"] = dispatch_combine(world, topology, TINY if args.tiny else MIXTRAL,
                                                  args.seq, [int(k) for k in
                                                             args.topks.split(",")], args.reps)
    except Exception:  # noqa: BLE001 — record it, then fail the run
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr, flush=True)
        status = 1
    if rank == 0:
        rows = result.get("correctness", [])
        result["correctness_summary"] = {"cases": len(rows),
                                         "failed": sum(not r["ok"] for r in rows)}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"[multigpu] correctness: {len(rows)} cases, "
              f"{result['correctness_summary']['failed']} failed; wrote {args.out}", flush=True)
        status = status or int(result["correctness_summary"]["failed"] > 0)
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
