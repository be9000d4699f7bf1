"""Is the grouped expert FFN's gap to dense a clock effect? SM clock and power while each runs.

    python bench/gpu_ffn_clocks.py --out bench/results/gpu_ffn_clocks.json   # ~1 min, H200

An H200 under sustained GEMMs sits at its power cap and lowers its SM clock to stay there, so a
kernel that draws more power per unit time also runs at a lower clock. If the grouped FFN
(64 weight matrices read and written, not one) drew more, part of its gap to the dense GEMMs of
``bench/gpu_moe.py`` would be the clock, not the kernels. Here the expert FFN forward +
backward as MoNTA runs it (``MoNTAGroupedMLP``, its default kernels) and the dense GEMMs of the
same FLOPs run back to back for ``--seconds`` each, alternating, ``--rounds`` times per shape,
while ``nvidia-smi`` samples the SM clock, power draw and throttle reasons every 50 ms. Per
phase: the median ms per FFN, and the medians of the samples taken inside it; "per clock" is
the ratio of ms × MHz, i.e. cycles (what the time would be at equal clocks). Writes the JSON
and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_moe import SHAPES, environment, init_world, monta_experts, routed_counts  # noqa: E402

QUERY = "timestamp,clocks.sm,power.draw,clocks_event_reasons.active"


def ffn_pair(shape: dict, tokens: int, device, dtype) -> dict:
    """{name: one forward + backward}: MoNTA's grouped FFN and the dense GEMMs of its FLOPs."""
    from monta.experts import activation_with_probs

    h, f, e, k = shape["hidden"], shape["ffn"], shape["experts"], shape["topk"]
    counts = routed_counts(tokens, e, k, device)
    n = int(counts.sum())
    gen = torch.Generator(device=device).manual_seed(2)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=gen) * scale).to(dtype)

    x = rand(n, h).requires_grad_(True)
    probs = torch.rand(n, 1, device=device, generator=gen)
    experts = monta_experts(shape, rand(e, h, 2 * f, scale=h ** -0.5),
                            rand(e, f, h, scale=f ** -0.5), device, dtype)
    d1 = rand(h, 2 * f, scale=h ** -0.5).requires_grad_(True)
    d2 = rand(f, h, scale=f ** -0.5).requires_grad_(True)
    grad = rand(n, h)

    def clear():
        for t in (x, d1, d2, *experts.parameters()):
            t.grad = None

    def grouped():
        clear()
        experts(x, counts, probs.view(-1))[0].backward(grad)

    def dense():
        clear()
        (activation_with_probs(x @ d1, probs, F.silu, True) @ d2).backward(grad)

    return {"dense": dense, "grouped": grouped}


SETTLE_S = 1.0  # the first second of a phase settles the clock from the previous phase's load


def run_phase(fn, seconds: float) -> dict:
    """``fn`` back to back for ``seconds``; ms per call from CUDA events over blocks of 4, from
    the blocks that end after :data:`SETTLE_S`, the window the clock samples are taken from."""
    fn()
    torch.cuda.synchronize()
    start_wall, per_call = time.time(), []
    while time.time() - start_wall < seconds:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(4):
            fn()
        stop.record()
        stop.synchronize()
        if time.time() - start_wall >= SETTLE_S:
            per_call.append(start.elapsed_time(stop) / 4)
    return {"start": start_wall + SETTLE_S, "end": time.time(),
            "ms": statistics.median(per_call)}


def parse_samples(text: str) -> list[tuple]:
    samples = []
    for line in text.strip().splitlines():
        stamp, clock, power, reasons = (c.strip() for c in line.split(","))
        try:  # nvidia-smi prints local time, as time.time() is read against here
            when = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((when, float(clock), float(power), reasons))
        except ValueError:  # "[N/A]" and the like
            continue
    return samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="fine_grained,mixtral")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args(argv)
    if opts.seconds <= SETTLE_S:
        parser.error(f"--seconds must exceed the {SETTLE_S:.0f} s each phase settles for")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (and nvidia-smi)")
    device, dtype = torch.device("cuda"), torch.bfloat16
    init_world(device)
    out = {"environment": environment(device), "seconds": opts.seconds, "rounds": opts.rounds,
           "shapes": {}}
    for name in opts.shapes.split(","):
        fns = ffn_pair(SHAPES[name], opts.tokens, device, dtype)
        sampler = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}",
                                    "--format=csv,noheader,nounits", "-lms", "50"],
                                   stdout=subprocess.PIPE, text=True)
        phases = []
        try:
            for _ in range(opts.rounds):
                for variant, fn in fns.items():
                    phases.append({"variant": variant, **run_phase(fn, opts.seconds)})
        finally:
            sampler.terminate()
            samples = parse_samples(sampler.communicate()[0])
        for phase in phases:
            inside = [s for s in samples if phase["start"] <= s[0] <= phase["end"]]
            phase.update(samples=len(inside),
                         clock_mhz=statistics.median(s[1] for s in inside) if inside else None,
                         power_w=statistics.median(s[2] for s in inside) if inside else None,
                         throttle_reasons=sorted({s[3] for s in inside}))
        summary = {}
        for variant in fns:
            mine = [p for p in phases if p["variant"] == variant and p["clock_mhz"]]
            summary[variant] = {key: statistics.median(p[key] for p in mine)
                                for key in ("ms", "clock_mhz", "power_w")} if mine else {}
        if summary["dense"] and summary["grouped"]:
            dense, grouped = summary["dense"], summary["grouped"]
            summary["fraction_of_dense"] = dense["ms"] / grouped["ms"]
            summary["fraction_of_dense_per_clock"] = (dense["ms"] * dense["clock_mhz"]
                                                      / (grouped["ms"] * grouped["clock_mhz"]))
        out["shapes"][name] = {"phases": phases, "summary": summary}
        print(name, json.dumps(summary), flush=True)
    opts.out.write_text(json.dumps(out, indent=1))
    lines = [f"Expert FFN forward + backward under sustained load "
             f"({out['environment'].get('device')}, commit "
             f"{out['environment'].get('git_commit')}; {opts.rounds} alternating phases of "
             f"{opts.seconds:.0f} s each; medians):", "",
             "| shapes | variant | ms | SM clock MHz | power W | % of dense | % of dense per clock |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, shape in out["shapes"].items():
        s = shape["summary"]
        for variant in ("dense", "grouped"):
            v = s.get(variant) or {}
            if not v:
                continue
            ratio = per_clock = "—"
            if variant == "grouped" and "fraction_of_dense" in s:
                ratio = f"{100 * s['fraction_of_dense']:.0f} %"
                per_clock = f"{100 * s['fraction_of_dense_per_clock']:.0f} %"
            lines.append(f"| {name} | {variant} | {v['ms']:.2f} | {v['clock_mhz']:.0f} | "
                         f"{v['power_w']:.0f} | {ratio} | {per_clock} |")
    opts.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
