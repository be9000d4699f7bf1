"""How much of one MoE-layer pass is the host's latency before the GPU has work: megatron vs MoNTA.

    python bench/gpu_front_latency.py --out bench/results/gpu_front_latency.json  # ~40 s, H200

``bench/gpu_moe.py`` times a layer "one pass" (between two syncs, the host's latency on the
clock) and "back to back" (passes queued without a sync, as training runs them). Back to back
differs in two ways at once: the host's latency is hidden *and* the GPU runs under sustained
load, at another clock. This bench separates the first. Every sample starts the same way, a
~2 ms sleep kernel on the GPU (the same thermal and power history), and the clock starts when
the sleep ends. Two ways to run the layer after it:

* ``exposed``: the host waits for the sleep to end, then runs the layer: its launches reach an
  idle GPU one by one, as after any sync;
* ``hidden``: the host runs the layer at once, queuing behind the sleep, so when the clock
  starts the GPU has the front of the layer queued.

``exposed - hidden`` is the time the GPU waits for the host in one pass. The bench also
records, unprofiled, when MoNTA's layer reaches each step of its forward on the host
(``host_timeline``): where that latency is spent. torch.profiler cannot show this: under it
every host operation ran 2-3× slower on the H200 machine. Last, ``gating_host_us``: the host
time of the router's gating call (one ``torch.mm``) after different work, each time after the
same GPU sleep: whether the host's cost is the layer's code or what the work before it left.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_timing import Timer, rotated  # noqa: E402
from monta.provenance import source_commit  # noqa: E402

TOKENS = 8192
SLEEP_CYCLES = 4_000_000  # ~2 ms at the H200's clock: longer than any layer's host front
MODES = ("exposed", "hidden")
LAYERS = {"megatron": "megatron_sequential", "monta": "monta_grouped"}


def idle_after_sleep() -> None:
    """Return with the GPU idle, just after it ran the same sleep kernel as every sample."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    torch.cuda.synchronize()


def time_pass(step, hidden: bool) -> float:
    """ms of ``step()`` on the GPU from the end of a sleep kernel (module doc)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(SLEEP_CYCLES)
    start.record()
    if not hidden:
        start.synchronize()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def host_timeline(step, hooks: dict, passes: int, before=None) -> dict:
    """Median host time (µs, from the start of ``step()``) at which each hooked method is
    entered and left: ``hooks`` {label: (object, method name)}, wrapped for the ``passes``
    calls and restored after; ``before()`` runs ahead of each pass, off the clock. Methods not
    reached in a pass are left out of its samples."""
    marks: list = []
    start = [0.0]
    originals = {label: getattr(obj, name) for label, (obj, name) in hooks.items()}
    own = {label for label, (obj, name) in hooks.items() if name in vars(obj)}

    def wrapped(label, fn):
        def run(*args, **kwargs):
            marks.append((f"{label} >", time.perf_counter() - start[0]))
            try:
                return fn(*args, **kwargs)
            finally:
                marks.append((f"{label} <", time.perf_counter() - start[0]))
        return run

    for label, (obj, name) in hooks.items():
        setattr(obj, name, wrapped(label, originals[label]))
    samples = defaultdict(list)
    try:
        for _ in range(passes):
            if before is not None:
                before()
            marks.clear()
            start[0] = time.perf_counter()
            step()
            marks.append(("step returned", time.perf_counter() - start[0]))
            seen = set()
            for mark, seconds in marks:
                if mark not in seen:  # the first time in the pass
                    seen.add(mark)
                    samples[mark].append(seconds * 1e6)
    finally:
        for label, (obj, name) in hooks.items():
            if label in own:
                setattr(obj, name, originals[label])
            else:  # a method the wrapper hid as the instance's own attribute
                delattr(obj, name)
    return dict(sorted(((mark, statistics.median(us)) for mark, us in samples.items()),
                       key=lambda item: item[1]))


def gating_host_us(router, inp, before: dict, passes: int = 15) -> dict:
    """Median host µs of ``router.gating(inp)`` after each of ``before`` {label: work}, the GPU
    idle after the same sleep each time."""
    out = {}
    for label, work in before.items():
        samples = []
        for _ in range(passes):
            work()
            idle_after_sleep()
            start = time.perf_counter()
            router.gating(inp)
            samples.append((time.perf_counter() - start) * 1e6)
        out[label] = statistics.median(samples)
    return out


def monta_hooks(layer) -> dict:
    """The steps of MoNTA's layer forward up to its first expert GEMM."""
    from monta import expert_gemm, per_expert_gemm

    router, dispatcher = layer.router, layer.token_dispatcher
    return {"router gating": (router, "gating"), "router routing": (router, "routing"),
            "dispatch preprocess": (dispatcher, "dispatch_preprocess"),
            "dispatch postprocess (permutation)": (dispatcher, "dispatch_postprocess"),
            "experts": (layer.experts, "forward"),
            "wait for the counts": (per_expert_gemm.HostSplits, "get"),
            "a grouped GEMM": (expert_gemm, "_run"),
            "combine": (layer, "combine")}


def main(argv=None) -> int:
    from bench.gpu_moe import SHAPES, init_world
    from bench.gpu_moe_layer import build_layers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/gpu_front_latency.json"))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=8)
    opts = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    init_world(device)
    timer = Timer(device)
    result = {"device": torch.cuda.get_device_name(), "git_commit": source_commit(),
              "tokens": TOKENS, "rounds": opts.rounds, "sleep_cycles": SLEEP_CYCLES,
              "shapes": {}}
    print("| shapes | layer | exposed ms | hidden ms | host latency ms |\n|---|---|---:|---:|---:|")
    for shape_name in opts.shapes.split(","):
        shape = SHAPES[shape_name]
        layers = build_layers(shape, device, dtype)
        gen = torch.Generator(device=device).manual_seed(3)
        x = torch.randn(TOKENS // 2, 2, shape["hidden"], device=device, generator=gen).to(dtype)
        grad = torch.randn(x.shape, device=device, generator=gen).to(dtype)
        steps = {}
        for name, key in LAYERS.items():
            inp = x.clone().requires_grad_(True)

            def step(layer=layers[key], inp=inp):
                inp.grad = None
                for p in layer.parameters():
                    p.grad = None
                layer(inp)[0].backward(grad)
            steps[name] = step
        items = [(name, mode) for name in LAYERS for mode in MODES]
        samples = {item: [] for item in items}
        for name, mode in items:  # warm-up: tuning, compilation, the allocator
            for _ in range(3):
                time_pass(steps[name], mode == "hidden")
        for round_ in range(opts.rounds):
            for name, mode in rotated(items, round_, opts.rounds):
                timer.settle()
                samples[(name, mode)] += [time_pass(steps[name], mode == "hidden")
                                          for _ in range(5)]
        row = result["shapes"][shape_name] = {"shape": shape, "layers": {}}
        for name in LAYERS:
            exposed, hidden = (statistics.median(samples[(name, mode)]) for mode in MODES)
            row["layers"][name] = {"exposed_ms": exposed, "hidden_ms": hidden,
                                   "host_latency_ms": exposed - hidden,
                                   "samples_ms": {m: samples[(name, m)] for m in MODES}}
            print(f"| {shape_name} | {name} | {exposed:.2f} | {hidden:.2f} | "
                  f"{exposed - hidden:.2f} |")
        monta = layers[LAYERS["monta"]]
        row["monta_host_timeline_us"] = host_timeline(steps["monta"], monta_hooks(monta), 20,
                                                      before=idle_after_sleep)
        gating_input = x.clone().requires_grad_(True)
        row["gating_host_us"] = gating_host_us(monta.router, gating_input, {
            "a gating call": lambda layer=monta: layer.router.gating(gating_input),
            "MoNTA's forward": lambda layer=monta: layer(gating_input),
            "MoNTA's forward + backward": steps["monta"],
            "megatron's forward + backward": steps["megatron"]})
        del layers, monta
        torch.cuda.empty_cache()
    for shape_name, row in result["shapes"].items():
        print(f"\nMoNTA's layer, {shape_name}: host µs from the pass's start")
        for mark, us in row["monta_host_timeline_us"].items():
            print(f"  {us:9.1f}  {mark}")
        print("  the router's gating call, host µs after:")
        for label, us in row["gating_host_us"].items():
            print(f"  {us:9.1f}  {label}")
    Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
