"""Tables and plot of ``bench/moe_ab.py``'s result (Markdown next to the JSON, ``--plot``)."""

from __future__ import annotations

from pathlib import Path

from bench.harness import provenance_line
from monta.plotting import pyplot, skipped

_MB = 1e6


def _f(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(result: dict) -> str:
    meta = result
    loads = result["load_average"]
    lines = [
        "# MoE layer A/B on the emulated testbed: forward + backward, median of "
        f"{result['settings']['reps']} interleaved rounds",
        "",
        provenance_line(meta),
        "",
        f"{result['settings']['nodes']} nodes × {result['settings']['ranks_per_node']} ranks, "
        f"gloo; {result['settings']['tokens']} tokens × hidden {result['settings']['hidden']} "
        f"fp32 per rank, FFN {result['settings']['ffn_hidden']}, "
        f"{result['settings']['experts']} experts, SwiGLU. 1-min load average before the first "
        f"job {loads['before_first_job']:.2f}; other processes used up to "
        f"{result['foreign_cpu_cores_max']:.2f} cores during a job → "
        f"**{'clean' if result['clean'] else 'NOT CLEAN (shared CPUs; timings are noisy)'}**.",
        "",
        "*layer* = fwd+bwd ms; *comm* = layer − no-comm reference (EP=TP=1, no collectives; "
        "dispatch+combine fwd+bwd incl. bookkeeping, minus overlap); *inter/intra* = payload MB "
        "per fwd+bwd summed over ranks (counters, no meta); ratios vs stock `alltoall`.",
        "",
    ]
    for cap in result["caps"]:
        lines += [f"## inter-node cap {cap:g} Gbit/s", "",
                  "| layout | top-k | candidate | layer ms | comm ms | inter MB | intra MB | "
                  "layer speedup | comm speedup | inter bytes ÷ stock |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["rows"]:
            if row["cap_gbit"] != cap:
                continue
            lines.append(
                f"| {row['layout']['name']} | {row['topk']} | {row['label']}"
                f"{' → ' + row['tuned'] if row.get('tuned') else ''} "
                f"| {row['layer_ms_median']:.0f} "
                f"| {'—' if row['label'] == 'nocomm' else format(row['comm_ms'], '.0f')} "
                f"| {row['inter_bytes'] / _MB:.1f} | {row['intra_bytes'] / _MB:.1f} "
                f"| {_f(row['speedup_vs_alltoall'], '.2f')} "
                f"| {_f(row['comm_speedup_vs_alltoall'], '.2f')} "
                f"| {_f(row['inter_bytes_vs_alltoall'], '.2f')} |")
        lines.append("")
    lines += ["## Per case: the best candidate, and what `monta/tune` picked by itself", "",
              "*comm speedup* = stock comm ms ÷ candidate comm ms (dispatch + combine, fwd + bwd); "
              "*inter ÷* = stock inter bytes ÷ tune's (the byte ratio the comm speedup is "
              "held against); *vs ds_tp* = ds_tp comm ms ÷ tune's.", "",
              "| cap Gbit/s | layout | top-k | best | layer speedup | best monta | its layer "
              "speedup | tune → pick | tune layer speedup | tune comm speedup | inter ÷ "
              "| tune comm vs ds_tp |", "|---:|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|"]
    for s in result["summary"]:
        lines.append(f"| {s['cap_gbit']:g} | {s['layout']} | {s['topk']} | {s['best']} "
                     f"| {s['best_speedup']:.2f} | {s['best_monta']} "
                     f"| {s['best_monta_speedup']:.2f} | {s.get('tune_pick') or '—'} "
                     f"| {_f(s.get('tune_speedup'), '.2f')} "
                     f"| {_f(s.get('tune_comm_speedup'), '.2f')} "
                     f"| {_f(s.get('tune_inter_bytes_ratio'), '.2f')} "
                     f"| {_f(s.get('tune_comm_speedup_vs_ds_tp'), '.2f')} |")
    if result.get("training"):
        t = result["settings"]
        lines += ["", f"## Full training step ({t['train_layers']} layers, TP1·EP4, "
                  f"{t['train_cap']:g} Gbit/s, `--mock-data`, {t['train_iters']} iterations, "
                  f"median over iterations > {t['train_skip']} of {t['train_reps']} runs each)",
                  "", "| top-k | dispatcher | iteration ms | speedup | fwd dispatch+combine "
                  "ms/step | inter MB/step | intra MB/step |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        lines.insert(len(lines) - 2, "*fwd dispatch+combine* = the `moe-time/layerL/"
                     "{dispatch,combine}-ms` scalars summed over layers: forward only, and with "
                     "`--monta-chunks` > 1 they include the experts (the pipeline is timed as "
                     "one), so they do not compare across dispatchers; iteration time does.\n")
        for row in result["training"]:
            name = row["dispatcher"] + (f" `{row['monta_args']}`" if row["monta_args"] else "")
            mb = {link: row[f"{link}_bytes_per_step"] for link in ("inter", "intra")}
            lines.append(f"| {row['topk']} | {name} | {row['iteration_ms_median']:.0f} "
                         f"| {row['speedup_vs_alltoall']:.2f} "
                         f"| {row['fwd_dispatch_combine_ms_per_step']:.0f} "
                         f"| {_f(mb['inter'] and mb['inter'] / _MB, '.1f')} "
                         f"| {_f(mb['intra'] and mb['intra'] / _MB, '.1f')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> str:
    plt = pyplot(path)
    if plt is None:
        return skipped(path)
    layout_names = list(dict.fromkeys(r["layout"]["name"] for r in result["rows"]))
    caps = result["caps"]
    all_labels = list(dict.fromkeys(r["label"] for r in result["rows"] if r["label"] != "nocomm"))
    cmap = plt.get_cmap("tab20" if len(all_labels) > 10 else "tab10")
    color = {label: cmap(i) for i, label in enumerate(all_labels)}  # one colour per candidate
    fig, axes = plt.subplots(len(layout_names), len(caps), squeeze=False,
                             figsize=(5.5 * len(caps), 3.8 * len(layout_names)))
    for i, layout in enumerate(layout_names):
        for j, cap in enumerate(caps):
            ax = axes[i][j]
            rows = [r for r in result["rows"] if r["layout"]["name"] == layout
                    and r["cap_gbit"] == cap]
            topks = sorted({r["topk"] for r in rows})
            labels = list(dict.fromkeys(r["label"] for r in rows if r["label"] != "nocomm"))
            width = 0.8 / max(1, len(labels))
            for k, label in enumerate(labels):
                ys = [next((r["layer_ms_median"] for r in rows if r["topk"] == t
                            and r["label"] == label), 0) for t in topks]
                ax.bar([x + k * width for x in range(len(topks))], ys, width, label=label,
                       color=color[label])
            nocomm = [next(r["layer_ms_median"] for r in rows if r["topk"] == t
                           and r["label"] == "nocomm") for t in topks]
            for x, y in enumerate(nocomm):
                ax.hlines(y, x - width / 2, x + 0.8 - width / 2, colors="black",
                          linestyles="dashed", label="no-comm" if x == 0 else None)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(topks))],
                          [f"top-{t}" for t in topks])
            ax.set_ylabel("layer fwd+bwd (ms)")
            ax.set_title(f"{layout}, {cap:g} Gbit/s", fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7, ncol=2)
    verdict = "clean" if result["clean"] else "NOT CLEAN: shared CPUs, see the load fields"
    fig.suptitle(f"MoE layer A/B, {result['timestamp']}, {verdict}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
