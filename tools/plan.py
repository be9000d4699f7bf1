"""Pick a parallel strategy and MoE dispatcher for a model on a cluster (MoNTA's planner).

    # the MoNTA paper's cluster and model, the paper's layout, every dispatcher side by side
    python tools/plan.py --cluster a800_hdr200 --model paper-2x70b --seq-length 8192 \\
        --global-batch-size 16 --tp 8 --ep 2 --etp 8 --pp 1 --no-memory-check
    # Mixtral-8x7B on 64 H100, full search, JSON + plot of the top 8
    python tools/plan.py --cluster h100_ndr400 --model mixtral-8x7b --seq-length 4096 \\
        --global-batch-size 256 --top 8 --json plan.json --plot plan.png
    # a measured spec (tools/bench_comm.py) and pretrain_moe.py's own model flags after --
    python tools/plan.py --cluster bench/results/cluster_testbed_1gbit.yaml \\
        --peak-tflops 0.05 --memory-gb 5 -- --num-layers 4 --hidden-size 128 --num-experts 8 \\
        --moe-router-topk 2 --seq-length 128 --micro-batch-size 4 --global-batch-size 16

Prints the ranked table (predicted step time; exposed time per phase group; bytes per rank per
step on intra/inter links; memory per rank, "!" = does not fit), the pick's breakdown, *why*,
and the exact launch line. Pure Python: needs no GPU and no torch.distributed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from monta.planner.auto import supported_recompute  # noqa: E402
from monta.planner.cluster import list_presets, load_cluster  # noqa: E402
from monta.planner.costmodel import PlanContext  # noqa: E402
from monta.planner.model import (Workload, list_model_presets, load_model,  # noqa: E402
                                 model_from_args, workload_from_args)
from monta.planner.report import (context_line, format_plan, format_table, plot,  # noqa: E402
                                  result_json)
from monta.planner.routing import load_routing  # noqa: E402
from monta.planner.search import SearchSpace, search  # noqa: E402


def _sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__.split("\n\n")[0],
                                epilog="After --, pretrain_moe.py flags describe the model "
                                       "instead of --model.", allow_abbrev=False)
    p.add_argument("--cluster", required=True,
                   help=f"cluster YAML or preset ({', '.join(list_presets())})")
    p.add_argument("--model", help=f"HF config.json, HF model dir, preset "
                                   f"({', '.join(list_model_presets())}), or pretrain_moe.py "
                                   f"flags in one quoted string (--model=\"--num-layers 4 ...\")")
    p.add_argument("--world", type=int, help="ranks to plan for (default: the whole cluster)")
    g = p.add_argument_group("workload and model overrides")
    g.add_argument("--seq-length", type=int)
    g.add_argument("--micro-batch-size", type=int)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--topk", type=int, help="override the model's top-k")
    g.add_argument("--num-layers", type=int, help="override the model's layer count")
    g.add_argument("--routing", default=None,
                   help="expert-load histogram: JSON or TensorBoard dir (default uniform)")
    s = p.add_argument_group("search space (default: everything valid)")
    for name in ("tp", "pp", "ep", "etp"):
        s.add_argument(f"--{name}", type=_sizes, help="comma-separated sizes to try")
    s.add_argument("--dispatchers", default="alltoall,ds_tp,monta")
    s.add_argument("--chunks", type=_sizes, default=(1, 2, 4, 8))
    s.add_argument("--node-dedup", choices=("both", "on", "off"), default="both")
    s.add_argument("--recompute", choices=("supported", "none", "full", "both"),
                   default="supported", help="supported: what pretrain_moe.py accepts")
    s.add_argument("--distributed-optimizer", choices=("auto", "on", "off"), default="auto",
                   help="cost (and print) --use-distributed-optimizer; auto: on for bf16 "
                        "devices, off for the fp32 CPU testbed (not exercised on gloo)")
    s.add_argument("--no-memory-check", action="store_true",
                   help="rank plans that exceed device memory too (marked '!')")
    o = p.add_argument_group("cluster overrides")
    o.add_argument("--peak-tflops", type=float)
    o.add_argument("--memory-gb", type=float)
    o.add_argument("--nics-per-node", type=int)
    out = p.add_argument_group("output")
    out.add_argument("--top", type=int, default=10)
    out.add_argument("--json", metavar="PATH", help="write the result as JSON ('-' = stdout)")
    out.add_argument("--plot", metavar="PNG", help="stacked time breakdown of the top plans")
    return p


def build_context(args: argparse.Namespace, model_flags: list[str]) -> PlanContext:
    overrides = {k: v for k, v in (("peak_tflops", args.peak_tflops),
                                   ("memory_GB", args.memory_gb),
                                   ("nics_per_node", args.nics_per_node)) if v is not None}
    cluster = load_cluster(args.cluster, overrides).with_world(args.world)
    if not model_flags and args.model and args.model.lstrip().startswith("--"):
        model_flags = shlex.split(args.model)  # --model "--num-layers 4 --hidden-size 128 ..."
    if model_flags:
        from monta.training.arguments import parse_args

        margs = parse_args(model_flags)
        model, workload = model_from_args(margs), workload_from_args(margs)
    elif args.model:
        model, workload = load_model(args.model), None
    else:
        raise ValueError("give --model (config.json / preset) or pretrain_moe.py flags after --")
    if args.topk:
        model = dataclasses.replace(model, topk=args.topk)
    if args.num_layers:
        model = dataclasses.replace(model, num_layers=args.num_layers)
    base = workload or Workload(seq_length=args.seq_length or 4096)
    workload = Workload(args.seq_length or base.seq_length,
                        args.micro_batch_size or base.micro_batch_size,
                        args.global_batch_size or base.global_batch_size)
    dist_opt = {"on": True, "off": False,
                "auto": cluster.device.dtype == "bf16"}[args.distributed_optimizer]
    return PlanContext(cluster, model, workload, load_routing(args.routing),
                       distributed_optimizer=dist_opt)


def build_space(args: argparse.Namespace) -> SearchSpace:
    recompute = {"supported": supported_recompute(), "none": ("none",), "full": ("full",),
                 "both": ("none", "full")}[args.recompute]
    dedup = {"both": (False, True), "on": (True,), "off": (False,)}[args.node_dedup]
    return SearchSpace(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                       dispatchers=tuple(d for d in args.dispatchers.split(",") if d),
                       node_dedup=dedup, chunks=args.chunks, recompute=recompute,
                       check_memory=not args.no_memory_check)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    try:
        ctx = build_context(args, model_flags)
        result = search(ctx, build_space(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shown = list(result.ranked[:args.top])
    if args.json == "-":
        print(json.dumps(result_json(result, ctx, args.top), indent=1))
    else:
        print(context_line(ctx))
        print(f"{result.evaluated} strategies costed, {len(result.ranked)} fit, "
              f"{len(result.over_memory)} over memory, "
              f"{sum(result.rejected.values())} invalid")
        if shown:
            print(format_table(shown, title=f"top {len(shown)} by predicted step time:"))
        for note in (result.best.notes if result.best else ()):
            print(f"note: {note}")
        if result.best:
            print(format_plan(result.best))
        if args.json:
            Path(args.json).write_text(json.dumps(result_json(result, ctx, args.top),
                                                  indent=1) + "\n")
            print(f"wrote {args.json}")
    if args.plot and shown:
        print(f"wrote {plot(shown, args.plot, title=context_line(ctx).split(' | ')[1])}",
              file=sys.stderr if args.json == "-" else sys.stdout)
    if not result.ranked:
        leanest = min(result.over_memory, key=lambda p: p.memory.total_GB, default=None)
        print("error: no strategy fits" + (f"; the leanest, {leanest.candidate}, needs "
                                            f"{leanest.memory.total_GB:.1f} GB/rank of "
                                            f"{leanest.memory.capacity_GB:.1f}"
                                            if leanest else f": {result.rejected}"),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
