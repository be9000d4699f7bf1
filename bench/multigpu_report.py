"""Assemble ``bench/multigpu.sh``'s scratch directory into ``bench/results/multigpu_<kind>.json``
and a Markdown table beside it.

    python bench/multigpu_report.py --scratch DIR --kind nvidia-h200-x2 --world 2 \\
        --ranks-per-node 1 --out bench/results/multigpu_nvidia-h200-x2.json

Reads ``worker.json`` (correctness and dispatch+combine, from ``bench/multigpu_worker.py``),
``cluster.yaml`` (``tools/bench_comm.py``) and the end-to-end runs (``tb-<dispatcher>/`` and
``train-<dispatcher>.args``). For those it measures the device's dense peak here (a bf16 GEMM
on GPU, fp32 on CPU) and reports tokens/s, MFU = model FLOPs per step (the planner's FLOP model:
attention, router, top-k experts, LM head; × 3 for forward + backward) / (step time · ranks ·
peak), and the planner's predicted step time for the same flags on the measured cluster spec
(its device section filled with the measured peak), with the error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

WARMUP_ITERATIONS = 5


def measured_peak_tflops() -> tuple[float, str]:
    """Dense GEMM TFLOP/s of this device: bf16 8192³ on GPU, fp32 1024³ on CPU (best of 5)."""
    import torch

    on_gpu = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if on_gpu else (1024, torch.float32)
    device = "cuda" if on_gpu else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        if on_gpu:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n ** 3 / best / 1e12, f"{'bf16' if on_gpu else 'fp32'} {n}^3 GEMM"


def step_flops(args) -> float:
    """Model FLOPs of one training step (forward + backward = 3 × forward), whole job."""
    from monta.planner.compute import layer_flops, lm_head_flops
    from monta.planner.layout import Layout
    from monta.planner.model import model_from_args, workload_from_args

    model, workload = model_from_args(args), workload_from_args(args)
    one = Layout(1, 1)  # the whole model on one rank: per-rank FLOPs = the model's
    tokens = workload.seq_length * workload.micro_batch_size
    layer = layer_flops(model, one, workload, expert_copies=tokens * model.topk)
    forward = model.num_layers * (layer.projections + layer.core_attention + layer.experts)
    forward += lm_head_flops(model, one, workload)
    return 3 * forward * workload.global_batch_size / workload.micro_batch_size


def predicted_step_s(args, cluster_yaml: Path, world: int, peak: float) -> float | None:
    import yaml

    from monta.planner.cluster import cluster_from_dict
    from monta.planner.costmodel import PlanContext, evaluate
    from monta.planner.model import model_from_args, workload_from_args
    from monta.planner.plan import Candidate

    if not cluster_yaml.exists():
        return None
    raw = yaml.safe_load(cluster_yaml.read_text())
    # one host's GPUs split into emulated nodes of one rank measure only the "inter" class (and
    # one node only "intra"): both are the same physical link here, so the other is a copy
    links = raw["links"]
    for missing, present in (("intra", "inter"), ("inter", "intra")):
        if missing not in links and present in links:
            links[missing] = links[present]
    cluster = cluster_from_dict(raw, name="measured", overrides={
        "peak_tflops": peak, "memory_GB": 140.0, "dtype": "bf16"}).with_world(world)
    monta = args.moe_token_dispatcher_type == "monta"
    dedup = monta and args.monta_node_dedup == "on"
    chunks = args.monta_chunks if monta and isinstance(args.monta_chunks, int) else 1
    candidate = Candidate(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                          args.expert_model_parallel_size,
                          args.expert_tensor_parallel_size or args.tensor_model_parallel_size,
                          args.moe_token_dispatcher_type, dedup, chunks)
    ctx = PlanContext(cluster, model_from_args(args), workload_from_args(args),
                      distributed_optimizer=bool(args.use_distributed_optimizer))
    return evaluate(candidate, ctx).step_time_s


def training_rows(scratch: Path, world: int, peak: float | None = None,
                  how: str | None = None) -> list[dict]:
    """End-to-end rows; ``peak`` as the worker measured it on the run's GPU (else measured here)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from monta.training.arguments import parse_args

    rows = []
    for args_file in sorted(scratch.glob("train-*.args")):
        dispatcher = args_file.stem.removeprefix("train-")
        events = EventAccumulator(str(scratch / f"tb-{dispatcher}"), size_guidance={"scalars": 0})
        events.Reload()
        if "iteration-time" not in events.Tags().get("scalars", []):
            rows.append({"dispatcher": dispatcher, "error": "no iteration-time in TensorBoard"})
            continue
        times = [e.value for e in events.Scalars("iteration-time") if e.step > WARMUP_ITERATIONS]
        if peak is None:
            peak, how = measured_peak_tflops()
        args = parse_args(args_file.read_text().split())
        step_s = statistics.median(times)
        flops = step_flops(args)
        predicted = predicted_step_s(args, scratch / "cluster.yaml", world, peak)
        rows.append({
            "dispatcher": dispatcher, "flags": args_file.read_text().split(),
            "iterations_timed": len(times), "step_ms": step_s * 1e3,
            "tokens_per_s": args.global_batch_size * args.seq_length / step_s,
            "model_tflop_per_step": flops / 1e12,
            "mfu": flops / (step_s * world * peak * 1e12),
            "peak_tflops_measured": peak, "peak_measured_with": how,
            "planner_step_ms": predicted and predicted * 1e3,
            "planner_error_pct": predicted and (predicted / step_s - 1) * 100})
    base = next((r for r in rows if r["dispatcher"] == "alltoall" and "step_ms" in r), None)
    for row in rows:
        if base and "step_ms" in row:
            row["speedup_vs_alltoall"] = base["step_ms"] / row["step_ms"]
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Multi-GPU run: {result['kind']} ({result['world']} ranks, nodes of "
             f"{result['ranks_per_node']})", "", f"{result['timestamp']} · device "
             f"{result.get('device', '?')} · commit {result['git_commit'][:10]}", ""]
    summary = result.get("correctness_summary")
    if summary and result.get("correctness"):
        lines += [f"## Correctness vs the dense reference: {summary['cases']} cases, "
                  f"{summary['failed']} failed", "",
                  "| layout | dtype | dispatcher | cases | failed |", "|---|---|---|---:|---:|"]
        groups: dict[tuple, list] = {}
        for row in result["correctness"]:
            groups.setdefault((row["layout"], row["dtype"], row["dispatcher"]), []).append(row)
        for (layout, dtype, d), rows in groups.items():
            lines.append(f"| {layout} | {dtype} | {d} | {len(rows)} "
                         f"| {sum(not r['ok'] for r in rows)} |")
        lines.append("")
    if result.get("dispatch"):
        lines += ["## Dispatch + combine (MoE layer forward + backward)", "",
                  "| study | top-k | candidate | layer ms | comm ms | comm speedup | inter MB | "
                  "intra MB |", "|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in result["dispatch"]:
            cs = r.get("comm_speedup")
            lines.append(f"| {r['study']} | {r['topk']} | {r['candidate']}"
                         f"{' → ' + r['tuned'] if r.get('tuned') else ''} | {r['layer_ms']:.2f} "
                         f"| {r['comm_ms']:.2f} | {'—' if cs is None else f'{cs:.2f}'} "
                         f"| {r['inter_MB']:.1f} | {r['intra_MB']:.1f} |")
        lines.append("")
    if result.get("training"):
        lines += ["## End to end", "", "| dispatcher | step ms | tokens/s | MFU | speedup | "
                  "planner ms | planner error |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["training"]:
            if "step_ms" not in r:
                lines.append(f"| {r['dispatcher']} | {r['error']} | | | | | |")
                continue
            pm, pe = r.get("planner_step_ms"), r.get("planner_error_pct")
            lines.append(f"| {r['dispatcher']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} "
                         f"| {r['mfu'] * 100:.1f} % | {r.get('speedup_vs_alltoall', 1):.2f} "
                         f"| {'—' if pm is None else f'{pm:.1f}'} "
                         f"| {'—' if pe is None else f'{pe:+.1f} %'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--kind", required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--ranks-per-node", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from monta.provenance import source_commit

    result = {"benchmark": "multigpu", "kind": args.kind, "world": args.world,
              "ranks_per_node": args.ranks_per_node, "git_commit": source_commit(),
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
    worker = args.scratch / "worker.json"
    if worker.exists():
        result.update(json.loads(worker.read_text()))
    cluster = args.scratch / "cluster.yaml"
    if cluster.exists():
        result["cluster_spec_yaml"] = cluster.read_text()
    result["training"] = training_rows(args.scratch, args.world,
                                       result.get("peak_tflops_measured"),
                                       result.get("peak_measured_with"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    failed = (result.get("correctness_summary") or {}).get("failed", 0)
    return 1 if failed or "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
