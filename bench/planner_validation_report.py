"""Tables and plot of ``bench/planner_validation.py``'s result (Markdown next to the JSON,
``--plot``)."""

from __future__ import annotations

from pathlib import Path

from bench.harness import provenance_line
from monta.plotting import pyplot, skipped

KIND_COLOURS = {"alltoall": "tab:blue", "ds_tp": "tab:red", "monta": "tab:green",
                "monta+dedup": "tab:purple"}
CAP_MARKERS = {0.4: "v", 1.0: "o", 4.0: "^"}
BAND = 0.15  # the ±15 % band of the plot (the median-error goal)
FITS = {"peak": "peak_tflops: predicted = measured (no MoE communication)",
        "launch_0": "launch_overhead_us: predicted c8 − c1 = measured; hop_overhead_us: "
                    "predicted = measured",
        "launch_1": "launch_overhead_us (see above)"}


def _verdict(result: dict) -> str:
    return ("clean" if result["clean"] else
            "NOT CLEAN: shared CPUs, timings are noisy (see the load fields)")


def _comm_ms(phases: dict[str, float]) -> float:
    return sum(v for k, v in phases.items() if not k.startswith("compute/"))


def markdown(result: dict) -> str:
    s, cal, summ = result["settings"], result["calibration"], result["summary"]
    reps = f", pooled over {s['reps']} jobs per configuration" if s["reps"] > 1 else ""
    loads = result["load_average"]
    lines = [
        "# Planner validation: predicted vs measured training step on the emulated testbed", "",
        provenance_line(result), "",
        f"2 nodes × 2 ranks, gloo, fp32; `pretrain_moe.py --mock-data`, {s['layers']} layers, "
        f"hidden {s['hidden']}, {s['experts']} experts of FFN {s['ffn_hidden']}, sequence "
        f"{s['seq_length']}, micro-batch {s['micro_batch_size']} per rank; median "
        f"`iteration-time` of iterations {s['skip'] + 1}–{s['iters']}"
        f"{reps}. 1-min load average before the first job {loads['before_first_job']:.2f}; other "
        f"processes used up to {result['foreign_cpu_cores_max']:.2f} cores during a job → "
        f"**{_verdict(result)}**.", "",
        f"Calibration (the only fitted numbers; no configuration below is a calibration run): "
        f"links from `tools/bench_comm.py` (`bench/results/cluster_testbed_{{cap}}gbit.yaml`); "
        f"device from the `{cal['base_device']}` preset with "
        + ", ".join(f"`{k}` {cal['before'][k]:g} → **{cal['after'][k]:.4g}**"
                    for k in cal["fitted"])
        + f"{'' if 'launch_overhead_us' in cal['fitted'] else ' (launch and hop costs kept)'}:",
        "", "| calibration run | fits | measured ms | predicted ms |", "|---|---|---:|---:|",
        *[f"| {r['config']['cap_gbit']:g} Gbit/s top-{r['config']['topk']} {r['label']} "
          f"| {FITS[name]} | {r['measured_ms']:.0f} | {r['predicted_ms']:.0f} |"
          for name, r in cal["runs"].items()], "",
        *([f"**The launch-cost fit was clamped at 0** (unclamped "
           f"{cal['launch_overhead_us_unclamped']:.0f} µs): the chunked calibration run was "
           f"measured faster than its model allows — noise of a busy host.", ""]
          if cal.get("launch_overhead_us_unclamped") is not None else []),
        *([f"**The hop-cost fit was clamped at 0** (unclamped "
           f"{cal['hop_overhead_us_unclamped']:.0f} µs): the 1-chunk calibration run was "
           f"measured faster than its model without hop costs.", ""]
          if cal.get("hop_overhead_us_unclamped") is not None else []),
        "| cap Gbit/s | top-k | configuration | measured ms | predicted ms | error % | "
        "predicted compute ms | predicted comm ms | expert load max/mean |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        c, ph = row["config"], row["predicted_phases_ms"]
        compute = sum(v for k, v in ph.items() if k.startswith("compute/"))
        skew = [r["expert_load_max_over_mean"] for r in row["runs"]
                if r.get("expert_load_max_over_mean") is not None]
        lines.append(f"| {c['cap_gbit']:g} | {c['topk']} | {row['label']} "
                     f"| {row['measured_ms']:.0f} | {row['predicted_ms']:.0f} "
                     f"| {row['error_pct']:+.1f} | {compute:.0f} | {_comm_ms(ph):.0f} "
                     f"| {format(max(skew), '.2f') if skew else '—'} |")
    goals = summ["goals"]
    met = summ["goals_met"]
    lines += [
        "", "*error* = (predicted − measured) / measured; *compute* = attention + experts + LM "
        "head; *comm* = the rest of the predicted step (exposed EP dispatch/combine incl. α and "
        "per-chunk costs, TP/SP collectives, gradient all-reduce); *expert load max/mean* = "
        "the busiest expert's tokens over the mean, measured (`expert-load/max-over-mean`; the "
        "untrained router on mock data is skewed at small top-k), while the planner assumes "
        "uniform routing.",
        "", f"**Median |error| {summ['median_abs_error_pct']:.1f} %** (goal ≤ "
        f"{goals['median_abs_error_pct']:g} %: {'met' if met['median_abs_error_pct'] else 'NOT met'}),"
        f" **worst {summ['worst_abs_error_pct']:.1f} %** ({summ['worst_config']}; goal ≤ "
        f"{goals['worst_abs_error_pct']:g} %: {'met' if met['worst_abs_error_pct'] else 'NOT met'}) "
        f"over {summ['configs']} configurations.", "",
        "## Selection problems", "",
        "For each (cap, top-k) group: which configuration is fastest? The planner's pick is its "
        "lowest prediction; it succeeds when its measured step is within 5 % of the measured "
        "best.", "",
        "| problem | candidates (measured / predicted ms) | planner pick | measured best | "
        "pick ÷ best | success |", "|---|---|---|---|---:|---|"]
    for p in result["selection_problems"]:
        cands = "; ".join(f"{c['label']} {c['measured_ms']:.0f} / {c['predicted_ms']:.0f}"
                          for c in p["candidates"])
        lines.append(f"| {p['question']} | {cands} | {p['planner_pick']} "
                     f"| {p['measured_best']} | {p['pick_over_best']:.3f} "
                     f"| {'yes' if p['success'] else 'no'} |")
    if summ["selection_problems"]:
        lines += ["", f"**Selection: {summ['selection_successes']}/"
                      f"{summ['selection_problems']} right** (goal ≥ "
                      f"{goals['selection_success']:.0%}: "
                      f"{'met' if met['selection_success'] else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> str:
    plt = pyplot(path)
    if plt is None:
        return skipped(path)
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    rows = result["rows"]
    cal = list(result["calibration"]["runs"].values())
    values = [r["measured_ms"] for r in rows + cal] + [r["predicted_ms"] for r in rows + cal]
    lo, hi = min(values) * 0.8, max(values) * 1.2
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="predicted = measured")
    ax.fill_between([lo, hi], [lo * (1 - BAND), hi * (1 - BAND)],
                    [lo * (1 + BAND), hi * (1 + BAND)], color="grey", alpha=0.2,
                    label=f"±{BAND:.0%}")
    for r in rows:
        ax.scatter(r["measured_ms"], r["predicted_ms"],
                   color=KIND_COLOURS.get(r["dispatcher_kind"], "grey"),
                   marker=CAP_MARKERS.get(r["config"]["cap_gbit"], "s"), s=46, edgecolors="black",
                   linewidths=0.4, zorder=3)
    # legend proxies: colour = dispatcher, marker = cap
    for kind in dict.fromkeys(r["dispatcher_kind"] for r in rows):
        ax.scatter([], [], color=KIND_COLOURS.get(kind, "grey"), marker="s", label=kind)
    for cap, marker in CAP_MARKERS.items():
        if any(r["config"]["cap_gbit"] == cap for r in rows):
            ax.scatter([], [], marker=marker, color="white", edgecolors="black",
                       label=f"{cap:g} Gbit/s")
    ax.scatter([r["measured_ms"] for r in cal], [r["predicted_ms"] for r in cal], marker="x",
               color="black", s=50, label="calibration runs", zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain milliseconds on the log axes
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if str(int(v))[0] in "235" else ""))
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured step (ms, median iteration-time)")
    ax.set_ylabel("predicted step (ms, monta.planner)")
    summ = result["summary"]
    sel = (f", selection {summ['selection_successes']}/{summ['selection_problems']}"
           if summ["selection_problems"] else "")
    ax.set_title(f"Planner vs testbed: median |err| {summ['median_abs_error_pct']:.1f} %, "
                 f"worst {summ['worst_abs_error_pct']:.1f} %{sel}\n{result['timestamp']}, "
                 f"{_verdict(result)}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
