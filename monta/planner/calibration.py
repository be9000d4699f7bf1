"""``tools/bench_comm.py``'s measurements → a cluster spec: message sizes, α-β fits, the YAML
document, the table and the plot. Pure Python (matplotlib only for the plot), so the fits are
tested without a job and the planner can refit stored points.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from monta.plotting import pyplot, skipped

OPS = ("p2p", "all_to_all", "all_gather", "reduce_scatter")
LINKS = ("intra", "inter")
FIT_OP = "all_to_all"  # the links' headline numbers: MoE dispatch is an all-to-all
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
GB = 1e9


# --------------------------------------------------------------------------------------------
# Sizes, fits, the spec, tables
# --------------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``"64K"`` -> 65536, ``"16M"`` -> 16777216, ``"4096"`` -> 4096 (binary units; B optional)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _UNITS and not value[-1:].isdigit() else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64K, 16M)") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return int(number * _UNITS[unit])


def format_size(nbytes: float) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{nbytes:.0f}"


def size_sweep(min_size: int, max_size: int, factor: float) -> list[int]:
    if min_size > max_size or factor <= 1:
        raise ValueError(f"need min_size <= max_size and factor > 1, got --min-size {min_size} "
                         f"--max-size {max_size} --factor {factor}")
    sizes, size = [], float(min_size)
    while size <= max_size * (1 + 1e-9):
        sizes.append(int(size))
        size *= factor
    return sizes


def fit_alpha_beta(points: list[tuple[float, float]]) -> dict[str, float | None]:
    """Fit ``t = α + x/β`` to ``(x bytes, t seconds)`` points by ordinary least squares.

    Unweighted on purpose: the large messages, whose time is bandwidth, dominate, and the small
    ones cannot pull β up (a tbf-capped link lets its burst of ~256 KB through at line rate).
    A negative α is clamped to 0 and β refitted through the origin (β = Σx² / Σx·t); one
    point gives α = 0, β = x/t.

    Returns:
        ``{"latency_s", "bandwidth_Bps", "points", "rel_rms"}`` (rel_rms: root mean square of
        the relative residuals); bandwidth None when time does not grow with size.
    """
    pts = [(float(x), float(t)) for x, t in points if t > 0 and x > 0]
    if not pts:
        return {"latency_s": None, "bandwidth_Bps": None, "points": 0, "rel_rms": None}
    alpha, c = 0.0, None  # c = 1/β, seconds per byte
    n = len(pts)
    if n >= 2:
        mx = sum(x for x, _ in pts) / n
        mt = sum(t for _, t in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        if sxx > 0:
            c = sum((x - mx) * (t - mt) for x, t in pts) / sxx
            alpha = mt - c * mx
    if c is None or alpha < 0:
        alpha = 0.0
        c = sum(x * t for x, t in pts) / sum(x * x for x, _ in pts)
    rel = [((alpha + x * c) - t) / t for x, t in pts]
    return {"latency_s": alpha, "bandwidth_Bps": 1 / c if c > 0 else None, "points": n,
            "rel_rms": math.sqrt(sum(r * r for r in rel) / n)}


def fit_points(points: list[dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """``{link: {op: fit}}`` over the sweep's points (bytes against median seconds)."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for p in points:
        series.setdefault((p["link"], p["op"]), []).append((p["bytes"], p["median_s"]))
    fits: dict[str, dict[str, dict]] = {}
    for (link, op), pts in series.items():
        fits.setdefault(link, {})[op] = fit_alpha_beta(pts)
    return fits


def unfitted(fits: dict[str, dict[str, dict]]) -> list[tuple[str, str]]:
    """The (link, op)s whose time did not grow with size: no bandwidth to put in a spec."""
    return [(link, op) for link, by_op in fits.items() for op, fit in by_op.items()
            if not fit["bandwidth_Bps"]]


def payload_bytes(op: str, size: int, world: int) -> int:
    """Bytes one rank sends off-rank per op (what the counters must show; module docstring)."""
    return size if op == "p2p" else size * (world - 1) // world


def round_size(size: int, world: int) -> int:
    """Largest multiple of 4·world bytes (fp32, even splits) not above ``size``, at least one."""
    step = 4 * world
    return max(step, size // step * step)


def cluster_spec(result: dict[str, Any]) -> dict[str, Any]:
    """The YAML document: headline link numbers from the ``FIT_OP`` fit, other fits beside."""
    links = {}
    for link, fits in result["fits"].items():
        head = fits.get(FIT_OP) or next(iter(fits.values()))
        links[link] = {
            "bandwidth_GBps": _round(head["bandwidth_Bps"] / GB if head["bandwidth_Bps"] else
                                     None, 4),
            "latency_us": _round(head["latency_s"] * 1e6 if head["latency_s"] is not None
                                 else None, 1),
            "fit_op": FIT_OP if FIT_OP in fits else next(iter(fits)),
            "group_size": result["groups"][link]["size"],
            "node_bandwidth_GBps": _round(node_bandwidth(result, link), 4),
            "ops": {op: {"bandwidth_GBps": _round(f["bandwidth_Bps"] / GB
                                                  if f["bandwidth_Bps"] else None, 4),
                         "latency_us": _round(f["latency_s"] * 1e6
                                              if f["latency_s"] is not None else None, 1)}
                    for op, f in fits.items()},
        }
    contention = result.get("contention") or {}
    return {
        "nodes": result["nodes"],
        "ranks_per_node": result["ranks_per_node"],
        "links": links,
        "contention": {k: contention.get(k) for k in ("inter_under_intra", "intra_under_inter")},
        "measured_on": result["measured_on"],
        "date": result["date"],
        "load_average": result["load_average"],
        "foreign_cpu_cores": result["foreign_cpu_cores"],
        "clean": result["clean"],
        "source": "tools/bench_comm.py; GB = 1e9 bytes; bandwidth = payload bytes sent "
                  "off-rank per rank / time; headline numbers from the fit_op fit",
    }


def node_bandwidth(result: dict[str, Any], link: str) -> float | None:
    """GB/s that all ranks of a node send together on ``link`` while every group uses it at
    once: the contention stage's *alone* run of that class (every rank of a node is in one
    group of each class), G · payload per rank / (t − α of that op's fit). None without it."""
    c = result.get("contention") or {}
    t, size, w = c.get(f"{link}_alone_s"), c.get(f"{link}_size"), c.get(f"{link}_group_size")
    if not (t and size and w and w > 1):
        return None
    alpha = (result["fits"].get(link, {}).get(c.get(f"{link}_op")) or {}).get("latency_s") or 0
    seconds = t - alpha if t > 2 * alpha else t  # an α as large as t is a bad fit: ignore it
    return result["ranks_per_node"] * size * (w - 1) / w / seconds / GB


def quartiles(values: list[float]) -> list[float]:
    """[p25, median, p75] (one value repeated for fewer than 2 values)."""
    if len(values) < 2:
        return values * 3
    q = statistics.quantiles(values, n=4)
    return [q[0], statistics.median(values), q[2]]


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def table(result: dict[str, Any]) -> str:
    """Bus bandwidth (GB/s) per (link, op) and size, the fits, and the contention factors."""
    sizes = sorted({p["size"] for p in result["points"]})
    by_key = {(p["link"], p["op"], p["size"]): p for p in result["points"]}
    head = "| link | op | " + " | ".join(format_size(s) for s in sizes) + \
        " | latency µs | GB/s (fit) | fit rel. rms |"
    lines = [f"Bus bandwidth, GB/s (payload sent off-rank per rank / median time), "
             f"{result['nodes']} node(s) x {result['ranks_per_node']} rank(s), "
             f"{result['backend']}; 1-min load {result['load_average']['before'][0]:.2f} before, "
             f"{result['load_average']['after'][0]:.2f} after; other processes "
             f"{result['foreign_cpu_cores']} cores → "
             f"{'clean' if result['clean'] else 'NOT CLEAN'}", "", head,
             "|" + "---|" * (len(sizes) + 5)]
    for link, fits in result["fits"].items():
        for op, fit in fits.items():
            cells = []
            for s in sizes:
                p = by_key.get((link, op, s))
                cells.append(f"{p['busbw_GBps']:.3f}" if p else "—")
            lat = "—" if fit["latency_s"] is None else f"{fit['latency_s'] * 1e6:.0f}"
            bw = "—" if not fit["bandwidth_Bps"] else f"{fit['bandwidth_Bps'] / GB:.3f}"
            rms = "—" if fit["rel_rms"] is None else f"{fit['rel_rms']:.2f}"
            lines.append(f"| {link} | {op} | " + " | ".join(cells) + f" | {lat} | {bw} | {rms} |")
    c = result.get("contention")
    if c:
        lines += ["", "Contention (median time, ms; factor = together / alone):", "",
                  "| op | size | alone | together | factor | per-round ratio p25–p75 |",
                  "|---|---|---:|---:|---:|---|"]
        for link, op, key in (("inter", "all_to_all", "inter_under_intra"),
                              ("intra", "all_gather", "intra_under_inter")):
            q = c["ratio_quartiles"][link]
            lines.append(f"| {link} {op} | {format_size(c[f'{link}_size'])} "
                         f"| {c[f'{link}_alone_s'] * 1e3:.1f} "
                         f"| {c[f'{link}_together_s'] * 1e3:.1f} | {c[key]:.2f} "
                         f"| {q[0]:.2f}–{q[2]:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> str:
    """Bus bandwidth against message size, one panel per link class; returns a status line."""
    plt = pyplot(path)
    if plt is None:
        return skipped(path)
    import textwrap

    links = list(result["fits"])
    fig, axes = plt.subplots(1, len(links), figsize=(5.5 * len(links), 4.3), squeeze=False)
    for ax, link in zip(axes[0], links):
        sizes = sorted({p["size"] for p in result["points"] if p["link"] == link})
        for op, fit in result["fits"][link].items():
            pts = sorted((p["size"], p["bytes"], p["busbw_GBps"]) for p in result["points"]
                         if p["link"] == link and p["op"] == op)
            line, = ax.plot([s for s, _, _ in pts], [b for _, _, b in pts], marker="o",
                            label=op)
            if fit["bandwidth_Bps"]:  # the α-β model through the same sizes, dashed
                model = [x / (fit["latency_s"] + x / fit["bandwidth_Bps"]) / GB
                         for _, x, _ in pts]
                ax.plot([s for s, _, _ in pts], model, linestyle="--", color=line.get_color(),
                        alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [format_size(s) for s in sizes])
        ax.set_xlabel("message size per rank (bytes)")
        ax.set_ylabel("bus bandwidth (GB/s)")
        ax.set_title(f"{link} (group of {result['groups'][link]['size']}); dashed: α-β fit")
        ax.grid(True, alpha=0.3)
        ax.legend()
    load = result["load_average"]
    fig.suptitle("\n".join(textwrap.wrap(
        f"{result['nodes']} node(s) x {result['ranks_per_node']} rank(s), {result['date']}, "
        f"1-min load {load['before'][0]:.2f}/{load['after'][0]:.2f}: {result['measured_on']}",
        width=110)), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
