"""Markdown tables from ``bench/gpu_moe.py``'s JSON (every number is read from it).

    python bench/gpu_moe_report.py bench/results/gpu_moe.json     # prints; --write: beside it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPE_NAMES = {"mixtral": "Mixtral-8x7B-like", "fine_grained": "fine-grained (DeepSeek-style)"}


def _shape_label(name: str, shape: dict) -> str:
    return (f"{SHAPE_NAMES.get(name, name)}: h {shape['hidden']}, ffn {shape['ffn']}, "
            f"{shape['experts']} experts, top-{shape['topk']}")


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def header(r: dict) -> list[str]:
    env = r["environment"]
    lines = [f"# GPU tier: grouped-GEMM experts, MoE layer and training on one {env.get('device')}",
             "",
             f"{env['date']} · commit {env.get('git_commit')} · torch {env['torch']} · "
             f"megatron-core {env['megatron_core']} · Transformer Engine "
             f"{'yes' if env.get('transformer_engine') else 'no'} · `{env['command']}`"
             + (" · **tiny smoke run, not a measurement**" if r.get("tiny") else ""), ""]
    if "peak" in r:
        p = r["peak"]
        lines += [f"Dense bf16 peak, measured in this run: **{p['tflops']:.0f} TFLOP/s** "
                  f"({'×'.join(map(str, p['shape']))} matmul, median {p['median_ms']:.3f} ms).", ""]
    return lines


def expert_table(r: dict) -> list[str]:
    if "expert_gemm" not in r:
        return []
    first = next(iter(r["expert_gemm"].values()))
    lines = ["## Expert compute: grouped GEMM vs one dense GEMM of the same FLOPs", "",
             f"TFLOP/s (median of {first['projections']['fc1']['grouped']['reps']} runs; FFN: "
             f"{first['ffn_fwd_bwd']['grouped']['reps']}) and the fraction of the dense GEMM's "
             f"rate; {first['tokens']} tokens routed top-k by random logits; each row's variants "
             "in interleaved rounds. MoNTA: the experts' default kernels (`monta.expert_gemm`): "
             f"{_default_kernels(r)}; the FFN as `MoNTAGroupedMLP` runs it, one "
             f"cuBLAS GEMM per expert where its experts are large ({_per_expert_shapes(r)}); "
             "torch: `torch._grouped_mm` for all.", "",
             "| shapes | op | MoNTA | % of dense | torch | % of dense | loop (per expert) | "
             "% of dense | dense | torch, transposed weights |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, g in r["expert_gemm"].items():
        label = _shape_label(name, r["shapes"][name])
        rows = [(f"{p} fwd [{v['K']}→{v['N']}]", v) for p, v in g["projections"].items()]
        rows.append(("expert FFN fwd+bwd", g["ffn_fwd_bwd"]))
        for op, v in rows:
            t = v.get("grouped_transposed_weights")
            torch_only = v.get("grouped_torch")
            lines.append(f"| {label} | {op} | {v['grouped']['tflops']:.0f} | "
                         f"{_pct(v['grouped']['fraction_of_dense'])} | "
                         + (f"{torch_only['tflops']:.0f} | {_pct(torch_only['fraction_of_dense'])}"
                            if torch_only else "— | —")
                         + f" | {v['loop']['tflops']:.0f} | "
                         f"{_pct(v['loop']['fraction_of_dense'])} | {v['dense']['tflops']:.0f} | "
                         + (f"{t['tflops']:.0f} ({_pct(t['fraction_of_dense'])})" if t else "—")
                         + " |")
    padded = [(name, g) for name, g in r["expert_gemm"].items()
              if "grouped_padded" in g["ffn_fwd_bwd"]]
    if padded:
        env = r["environment"]
        lines += ["", f"Opt-in padded rows (`MONTA_EXPERT_ROW_ALIGNMENT=tile`): each expert's rows "
                  f"padded to a multiple of {env.get('padded_row_alignment')} with "
                  f"zero-probability copies, the GEMMs on the tile-aligned kernels "
                  f"`{env.get('grouped_gemm_padded')}` (FLOPs of the real rows; same rounds):", "",
                  "| shapes | fc1 fwd | fc2 fwd | expert FFN fwd+bwd | rows computed / real |",
                  "|---|---:|---:|---:|---:|"]
        for name, g in padded:
            cells = [f"{v['grouped_padded']['tflops']:.0f} ({_pct(v['grouped_padded']['fraction_of_dense'])})"
                     for v in (*g["projections"].values(), g["ffn_fwd_bwd"])]
            lines.append(f"| {_shape_label(name, r['shapes'][name])} | " + " | ".join(cells)
                         + f" | {g['padded_rows_used']} / {g['rows']} |")
    lines += _chained_ffn_table(r)
    lines += _fusion_table(r)
    lines += _per_op_table(r)
    act = [(name, g["activation_fwd_bwd"]) for name, g in r["expert_gemm"].items()
           if "activation_fwd_bwd" in g]
    if act:
        lines += ["", "SwiGLU × router probability between the two GEMMs, forward + backward "
                  "(ms, and GB/s of the least traffic: read h, write y, read h and dy, write dh):",
                  "", "| shapes | " + " | ".join(act[0][1]) + " |",
                  "|---|" + "---:|" * len(act[0][1])]
        for name, rows in act:
            cells = [f"{v['median_ms']:.2f} ms, {v['GB_per_s']:.0f} GB/s" if "median_ms" in v
                     else "failed" for v in rows.values()]
            lines.append(f"| {_shape_label(name, r['shapes'][name])} | " + " | ".join(cells) + " |")
    return lines + [""]


def _per_expert_shapes(r: dict) -> str:
    """The shapes whose expert FFN MoNTA runs per expert by default (monta/per_expert_gemm.py)."""
    return (", ".join(SHAPE_NAMES.get(name, name) for name, g in r["expert_gemm"].items()
                      if g.get("per_expert_by_default")) or "none of these shapes")


def _chained_ffn_table(r: dict) -> list[str]:
    rows = [(name, g["ffn_fwd_bwd"]) for name, g in r["expert_gemm"].items()
            if "chained_median_ms" in g["ffn_fwd_bwd"]["dense"]]
    if not rows:
        return []
    names = [(k, label) for k, label in (
        ("grouped", "MoNTA (default)"), ("per_expert", "one cuBLAS GEMM per expert (`cublas`)"),
        ("one_stream", "MoNTA (default), one stream (`MONTA_WGRAD_STREAM=0`)"),
        ("grouped_only", "MoNTA's grouped kernels (`grouped`)"),
        ("grouped_torch", "`torch._grouped_mm`"),
        ("grouped_unfused", "grouped, SwiGLU·prob unfused"),
        ("grouped_fused_fwd", "grouped, SwiGLU·prob fused into fc1 (`fwd`)"),
        ("grouped_fused_bwd", "grouped, SwiGLU·prob's backward in fc2's input gradient (`bwd`)"),
        ("previous_default", "grouped, the previous default (rows on `128x256_c1x2`, weight "
                             "gradient on torch, SwiGLU·prob fused into fc1)"),
        ("grouped_padded", "MoNTA, padded rows"),
        ("grouped_balanced", "MoNTA (default), balanced: n / E rows per expert"))
        if k in rows[0][1]]
    lines = ["", f"The expert FFN forward + backward back to back ({rows[0][1]['dense']['chain']} "
             "calls without a sync, as a training step runs its layers: launch latency off the "
             "clock for all), ms (% of dense; same run, interleaved). MoNTA's default runs one "
             "cuBLAS GEMM per expert where the experts' GEMMs are large (`monta/per_expert_gemm.py`"
             f": {_per_expert_shapes(r)}), else the grouped kernels. \"Balanced\": the same default "
             "FFN with every expert given exactly n / E rows, so no expert ends in a partly "
             "filled tile (not a routing real tokens get; it prices routing imbalance):", "",
             "| shapes | " + " | ".join(label for _, label in names) + " | dense |",
             "|---|" + "---:|" * (len(names) + 1)]
    for name, ffn in rows:
        cells = [f"{ffn[k]['chained_median_ms']:.2f} ({_pct(ffn[k]['chained_fraction_of_dense'])})"
                 if "chained_median_ms" in ffn.get(k, {}) else "—" for k, _ in names]
        lines.append(f"| {_shape_label(name, r['shapes'][name])} | " + " | ".join(cells)
                     + f" | {ffn['dense']['chained_median_ms']:.2f} |")
    return lines


def _fusion_table(r: dict) -> list[str]:
    rows = [(name, g["ffn_fwd_bwd"]) for name, g in r["expert_gemm"].items()
            if "grouped_unfused" in g["ffn_fwd_bwd"]]
    if not rows:
        return []
    lines = ["", "SwiGLU × router probability fused into the GEMMs' epilogues "
             "(`monta/swiglu_gemm.py`, `MONTA_FUSED_SWIGLU`), on the grouped kernels "
             "(`MONTA_GROUPED_GEMM=grouped`), expert FFN forward + backward, "
             "ms (% of dense; same rounds). The default (`auto`) is `fwd`, except `0` where "
             "the row GEMMs run on MoNTA's small-expert sm90 kernels without their own fused "
             "fc1 (`monta/csrc/sm90_swiglu_fc1.cuh`, in runs since baee1e3, which `fwd` runs "
             "there); `bwd` (in runs since 4d86cea) is opt-in:",
             "",
             "| shapes | fused into fc1's forward (`fwd`) | unfused (`0`) | also into fc2's "
             "input gradient (`all`) | only the backward, in fc2's input gradient on sm90 "
             "(`bwd`) | dense |", "|---|---:|---:|---:|---:|---:|"]
    for name, ffn in rows:
        # older runs had no fwd variant: fused into fc1 was their grouped kernels' default
        fwd = next(k for k in ("grouped_fused_fwd", "grouped_only", "grouped") if k in ffn)
        cells = [f"{ffn[k]['median_ms']:.2f} ({_pct(ffn[k]['fraction_of_dense'])})"
                 if k in ffn else "—"
                 for k in (fwd, "grouped_unfused", "grouped_fused_all", "grouped_fused_bwd")]
        lines.append(f"| {_shape_label(name, r['shapes'][name])} | " + " | ".join(cells)
                     + f" | {ffn['dense']['median_ms']:.2f} |")
    return lines


def _default_kernels(r: dict) -> str:
    """What the default ran per shape (runs before 53fd0bd recorded one choice, in the
    environment)."""
    per_shape = {name: g["default_kernels"] for name, g in r["expert_gemm"].items()
                 if "default_kernels" in g}
    if not per_shape:
        return _monta_kernels(r["environment"])
    return "; ".join(f"{_shape_label(name, r['shapes'][name]).split(':')[0]}: "
                     f"{_monta_kernels(kernels)}" for name, kernels in per_shape.items())


def _monta_kernels(env: dict) -> str:
    """``env``: the default's grouped-GEMM pin and SwiGLU fusion (``grouped_gemm_default``,
    ``fused_swiglu``, ``sm90_fused_fc1``)."""
    unpadded = env.get("grouped_gemm_default")
    fused = {"0": "", "bwd": ", SwiGLU·prob's backward in the epilogue of fc2's input gradient "
                            "(`monta/csrc/sm90_swiglu_dgrad.cuh`)"}.get(
        env.get("fused_swiglu", "0"), ", SwiGLU·prob fused into fc1's forward "
                                      "(`monta/swiglu_gemm.py`)")
    sm90_fc1 = env.get("sm90_fused_fc1") if env.get("fused_swiglu") == "fwd" else None
    if sm90_fc1:  # the row kernel itself, with the activation in its epilogue
        fused = (f", SwiGLU·prob fused into fc1's forward on `sm90:{sm90_fc1}` "
                 "(`monta/csrc/sm90_swiglu_fc1.cuh`)")
    if unpadded and unpadded != "torch":
        # sm90:<rows>[,<weight gradient>[,<input gradient>]] (monta/expert_gemm.py)
        rows, wgrad, dgrad = (unpadded.removeprefix("sm90:").split(",") + ["", ""])[:3]
        wgrad = f"`sm90:{wgrad}`" if wgrad else "torch"
        gemms = (f"forward on `sm90:{rows}`, input gradient on `sm90:{dgrad}`" if dgrad
                 else f"forward and input gradient on `sm90:{rows}`")
        return (f"{gemms}, weight gradient on {wgrad}"
                + fused + (" for the other GEMMs" if fused and not sm90_fc1 else "")
                + ("" if fused else ", SwiGLU·prob as its own kernels"))
    return "`torch._grouped_mm`" + fused


def _per_op_table(r: dict) -> list[str]:
    rows = [(name, proj, v) for name, g in r["expert_gemm"].items()
            for proj, v in g["projections"].items() if "per_op" in v]
    if not rows:
        return []
    lines = ["", "Each GEMM of a projection's forward + backward, `torch._grouped_mm` vs the dense GEMM of the "
             "same shape (TFLOP/s, % of dense; timed in the projection's interleaved rounds); \"balanced\": the forward with every expert given "
             "exactly n / E rows, i.e. without the partly filled last tile per expert that "
             "routing imbalance causes (not achievable with real routing):", "",
             "| shapes | projection | fwd | dgrad (dy·Wᵀ) | wgrad (xᵀ·dy) | fwd, balanced |",
             "|---|---|---:|---:|---:|---:|"]
    for name, proj, v in rows:
        ops = v["per_op"]

        def cell(op):
            o = ops.get(op)
            return "—" if o is None else (f"{o['grouped']['tflops']:.0f} vs "
                                          f"{o['dense']['tflops']:.0f} ({_pct(o['fraction_of_dense'])})")
        bal = ops.get("fwd_balanced")
        fwd = v.get("grouped_torch", v["grouped"])  # this table is torch._grouped_mm's
        lines.append(f"| {_shape_label(name, r['shapes'][name])} | {proj} [{v['K']}→{v['N']}] | "
                     f"{fwd['tflops']:.0f} vs {v['dense']['tflops']:.0f} "
                     f"({_pct(fwd['fraction_of_dense'])}) | {cell('dgrad')} | "
                     f"{cell('wgrad')} | "
                     + ("—" if bal is None else f"{bal['grouped']['tflops']:.0f} "
                        f"({_pct(bal['fraction_of_dense'])})") + " |")
    return lines


# MoNTA's layer under other settings (bench/gpu_moe_layer.py's extra runs): what each row is
LAYER_VARIANTS = {
    "monta_grouped_unfused": "with SwiGLU·prob as its own kernels (`MONTA_FUSED_SWIGLU=0`)",
    "monta_grouped_fused_fwd": "with SwiGLU·prob fused into fc1's forward "
                               "(`MONTA_FUSED_SWIGLU=fwd`)",
    "monta_grouped_sync_free": "on its grouped kernels only, never one GEMM per expert "
                               "(`MONTA_GROUPED_GEMM=grouped`: no host sync)",
    "monta_grouped_one_stream": "with every GEMM on one stream, weight gradients included "
                                "(`MONTA_WGRAD_STREAM=0`)",
}


def layer_table(r: dict) -> list[str]:
    if "moe_layer" not in r:
        return []
    lines = ["## MoE layer forward + backward (router, permutation, experts, combine), bf16", "",
             "megatron = megatron-core 0.16.1 `MoELayer` + `alltoall` dispatcher + `SequentialMLP`; "
             "MoNTA = `MoNTAGroupedMLP` under MoNTA's dispatcher (one-rank path) or megatron's "
             "`alltoall`, with MoNTA's router (megatron's, its aux loss computed after the experts "
             "are enqueued; on the one-rank path its top-k and softmax go straight into the expert "
             "order, one kernel). Same weights and routing; median of "
             f"{next(iter(r['moe_layer'].values()))['variants']['monta_grouped']['reps']} runs "
             "per variant, timed in interleaved rounds, each pass between two syncs; "
             "\"back to back\": passes queued without a sync in between, as a training step runs "
             "its layers (median of "
             f"{len(next(iter(r['moe_layer'].values()))['variants']['monta_grouped'].get('chained_samples_ms', []))}"
             " samples of "
             f"{next(iter(r['moe_layer'].values()))['variants']['monta_grouped'].get('chain', '—')}"
             " passes). Host syncs: operations "
             "that wait for the GPU in one forward + backward (torch sync debug mode, and waits on "
             "CUDA events).", "",
             "| shapes | megatron ms | MoNTA ms | speedup | back to back: megatron / MoNTA ms | "
             "speedup | MoNTA + alltoall ms | speedup | "
             "host syncs megatron / MoNTA / MoNTA+alltoall | output rel. err. vs megatron |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, layer in r["moe_layer"].items():
        v = layer["variants"]
        base, ours, a2a = v["megatron_sequential"], v["monta_grouped"], v["alltoall_grouped"]
        syncs = " / ".join(str(x.get("host_syncs", {}).get("count", "—")) for x in (base, ours, a2a))
        lines.append(f"| {_shape_label(name, r['shapes'][name])}, {layer['tokens']} tokens | "
                     f"{base['median_ms']:.2f} | {ours['median_ms']:.2f} | "
                     f"**{ours['speedup_vs_megatron']:.2f}×** | "
                     + (f"{base['chained_median_ms']:.2f} / {ours['chained_median_ms']:.2f} | "
                        f"**{ours['chained_speedup_vs_megatron']:.2f}×**"
                        if "chained_median_ms" in ours else "— | —")
                     + f" | {a2a['median_ms']:.2f} | "
                     f"{a2a['speedup_vs_megatron']:.2f}× | {syncs} | "
                     f"{ours.get('rel_err_output', float('nan')):.1e} |")
    for variant, what in LAYER_VARIANTS.items():
        rows = [(name, layer["variants"][variant]) for name, layer in r["moe_layer"].items()
                if variant in layer["variants"]]
        if not rows:
            continue
        lines += ["", f"MoNTA's layer {what}, same rounds:", "",
                  "| shapes | ms | speedup | back to back ms | speedup | host syncs |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, u in rows:
            lines.append(f"| {_shape_label(name, r['shapes'][name])} | {u['median_ms']:.2f} | "
                         f"{u['speedup_vs_megatron']:.2f}× | {u['chained_median_ms']:.2f} | "
                         f"{u['chained_speedup_vs_megatron']:.2f}× | "
                         f"{u.get('host_syncs', {}).get('count', '—')} |")
    return lines + [""]


def training_table(r: dict) -> list[str]:
    t = r.get("training")
    if not t:
        return []
    mfu = "—" if t["mfu"] is None else f"**{100 * t['mfu']:.1f} %**"
    memory = "—" if t["peak_memory_gib"] is None else f"{t['peak_memory_gib']:.1f} GiB"
    return ["## Training on one GPU", "", f"`{t['command']}`", "",
            "| parameters | tokens/step | iteration ms | tokens/s | model TFLOP/s | MFU | "
            "peak memory | loss first → last |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {t['parameters'] / 1e9:.2f} B | {t['tokens_per_step']} | "
            f"{t['iteration_ms_median']:.0f} | {t['tokens_per_s']:.0f} | "
            f"{t['model_tflops']:.0f} | {mfu} | {memory} | "
            f"{t['loss_first_last'][0]:.2f} → {t['loss_first_last'][1]:.2f} |", "",
            f"Steady iterations {t['steady_iterations'][0]}–{t['steady_iterations'][1]} (medians, "
            "profiled ones left out); "
            f"model FLOPs {t['model_tflop_per_token'] * 1e12 / 1e9:.2f} GFLOP per token "
            "(see `bench/gpu_moe.py`), MFU against the peak above.", ""] + _train_profile(t)


def _train_profile(t: dict) -> list[str]:
    p = t.get("profile")
    if not p:
        return []
    busy = "—" if p["gpu_busy_fraction"] is None else f"{100 * p['gpu_busy_fraction']:.0f} %"
    lines = [f"Profile of {p['steps']} training iterations: {p['wall_ms_per_step']:.0f} ms wall, "
             f"{p['gpu_kernel_ms_per_step']:.0f} ms of GPU kernels per iteration (GPU busy "
             f"{busy}), {p['kernel_launches_per_step']:.0f} kernel launches per iteration.", "",
             "| kernel | ms / iter | share | calls / iter |", "|---|---:|---:|---:|"]
    for k in p["top_kernels"][:10]:
        share = "—" if k["share"] is None else f"{100 * k['share']:.1f} %"
        lines.append(f"| `{k['kernel'][:90]}` | {k['ms_per_step']:.2f} | {share} | "
                     f"{k['calls_per_step']:.0f} |")
    host = ", ".join(f"`{h['op']}` {h['self_cpu_ms_per_step']:.0f} ms ({h['calls_per_step']:.0f}×)"
                     for h in p["top_host_ops"][:6])
    return lines + ["", f"Host time per iteration, top operations (self CPU): {host}.", ""]


def profile_tables(r: dict) -> list[str]:
    lines = []
    for name, layer in r.get("moe_layer", {}).items():
        prof = layer["variants"]["monta_grouped"].get("profile")
        if not prof:
            continue
        blocking = prof["blocking_runtime_calls_per_iter"] or "none"
        lines += [f"### Profile, MoNTA layer, {_shape_label(name, r['shapes'][name])}", "",
                  f"GPU kernels {prof['gpu_ms_per_iter']:.2f} ms per forward + backward"
                  + (f" (summed over streams; GPU busy {prof['gpu_busy_ms_per_iter']:.2f} ms)"
                     if "gpu_busy_ms_per_iter" in prof else "") + "; blocking "
                  f"CUDA runtime calls per iteration: {blocking}.", "",
                  "| kernel | ms / iter | share | calls / iter |", "|---|---:|---:|---:|"]
        for k in prof["top_kernels"][:10]:
            lines.append(f"| `{k['kernel'][:90]}` | {k['ms_per_iter']:.3f} | "
                         f"{100 * k['share']:.1f} % | {k['calls_per_iter']:.0f} |")
        lines.append("")
    return (["## Profiles (torch.profiler, top kernels by GPU time)", ""] + lines) if lines else []


def render(r: dict) -> str:
    lines = header(r) + expert_table(r) + layer_table(r) + training_table(r) + profile_tables(r)
    if r.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: `{v.strip().splitlines()[-1]}`"
                                      for k, v in r["errors"].items()] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json")
    parser.add_argument("--write", action="store_true", help="write the .md beside the JSON")
    opts = parser.parse_args()
    text = render(json.loads(Path(opts.json).read_text()))
    if opts.write:
        Path(opts.json).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
