"""How the per-expert experts wait for their counts: MoE layer forward + backward at Mixtral shapes.

    python bench/gpu_count_wait.py --out bench/results/gpu_count_wait.json   # ~1.5 min on an H200

At Mixtral shapes MoNTA's experts run one cuBLAS GEMM per expert (``monta/per_expert_gemm.py``),
so the host needs the experts' row counts, which the router makes on the GPU. The GPU idles from
their arrival until the host launches the first expert GEMM. Two places to wait, same layer and
weights, timed in interleaved rounds against megatron's ``SequentialMLP`` layer:

* ``eager_sync``: the wait at the experts' entry, in ``cudaEventSynchronize`` (before 5dbde7c);
* ``lazy_sync``: the wait inside ``PerExpertMM``, after its output is allocated (5dbde7c, the
  default).

At 792025a it also timed ``lazy_poll``, the wait as a Python loop over the event's ``query()``,
then the default (``bench/results/gpu_count_wait.json``); it was dropped (see
``monta/per_expert_gemm.py``).

Writes ``--out`` (JSON) and prints a table: one pass between two syncs, and 8 passes back to back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_timing import Timer  # noqa: E402
from monta.provenance import source_commit  # noqa: E402

TOKENS = 8192
MODES = {"eager_sync": True, "lazy_sync": False}  # name: read the counts at the experts' entry


def main(argv=None) -> int:
    from bench.gpu_moe import SHAPES, init_world
    from bench.gpu_moe_layer import CHAIN, build_layers, time_steps
    from monta import per_expert_gemm

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/gpu_count_wait.json"))
    parser.add_argument("--rounds", type=int, default=10)
    opts = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    init_world(device)
    shape = SHAPES["mixtral"]
    layers = build_layers(shape, device, dtype)
    timer = Timer(device)

    # the older wait, recreated around the current code: the counts read as soon as the
    # experts have them (eager)
    mode = {"eager": False}
    host_splits = per_expert_gemm.host_splits

    def splits_as_asked(*args):
        splits = host_splits(*args)
        if splits is not None and mode["eager"]:
            splits.get()
        return splits

    per_expert_gemm.host_splits = splits_as_asked

    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(TOKENS // 2, 2, shape["hidden"], device=device, generator=gen).to(dtype)
    grad = torch.randn(x.shape, device=device, generator=gen).to(dtype)
    inp = x.clone().requires_grad_(True)

    def variant(layer, eager=False):
        def step():
            mode.update(eager=eager)
            layer(inp)[0].backward(grad)

        def clear():
            inp.grad = None
            for p in layer.parameters():
                p.grad = None
        return step, clear

    variants = {"megatron": variant(layers["megatron_sequential"])}
    for name, eager in MODES.items():
        variants[name] = variant(layers["monta_grouped"], eager)
    one, chained = time_steps(variants, timer, opts.rounds, reps=5)
    base = statistics.median(one["megatron"]), statistics.median(chained["megatron"])
    result = {"device": torch.cuda.get_device_name(), "git_commit": source_commit(),
              "shape": shape, "tokens": TOKENS, "chain": CHAIN, "rounds": opts.rounds,
              "variants": {}}
    print("| variant | one pass ms | speedup | back to back ms | speedup |\n"
          "|---|---:|---:|---:|---:|")
    for name in variants:
        ms = statistics.median(one[name]), statistics.median(chained[name])
        result["variants"][name] = {"one_pass_ms": ms[0], "chained_ms": ms[1],
                                    "speedup_vs_megatron": [base[0] / ms[0], base[1] / ms[1]],
                                    "one_pass_samples_ms": one[name],
                                    "chained_samples_ms": chained[name]}
        print(f"| {name} | {ms[0]:.2f} | {base[0] / ms[0]:.3f}× | {ms[1]:.2f} | "
              f"{base[1] / ms[1]:.3f}× |")
    Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
