"""Plot a training run from its TensorBoard events: loss, throughput, expert load, link bytes.

    python tools/plot_run.py --tensorboard-dir runs/demo/tensorboard --out runs/demo/plots
    make plots                      # the same, after `make demo`

Writes (each only when the run logged its series; otherwise a note says what is missing):
  loss.png          training `lm loss` and `validation/lm loss`
  throughput.png    `tokens/s` and `tflops-per-rank` (model TFLOP/s per rank)
  expert_load.png   layers × experts heatmaps of `expert-load/layerL/expertE` (tokens routed to
                    each expert relative to a perfectly balanced share: 1.0 = balanced), mean
                    over the run and the last log interval; `expert-load/max-over-mean` over time
  link_bytes.png    MoE dispatcher bytes per step on intra- and inter-node links
                    (`moe-comm/*`), in total over time and per layer at the last log interval

Runs in subdirectories of --tensorboard-dir are plotted one by one into matching
subdirectories of --out. Exit code 1 when there are no event files or nothing to plot.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script: tools/ is on the path, the repo is not
    sys.path.insert(0, str(_REPO))

from monta.plotting import pyplot  # noqa: E402

EVENTS_GLOB = "events.out.tfevents.*"
_EXPERT = re.compile(r"^expert-load/layer(\d+)/expert(\d+)$")
_LAYER_BYTES = re.compile(r"^moe-comm/layer(\d+)/(intra|inter)-bytes$")


class Run:
    """The scalar series of one TensorBoard run directory: ``{tag: (steps, values)}``."""

    def __init__(self, directory: Path):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep all
        events.Reload()
        self.directory = directory
        self.series: dict[str, tuple[list[int], list[float]]] = {}
        for tag in events.Tags()["scalars"]:
            points = events.Scalars(tag)
            self.series[tag] = ([p.step for p in points], [p.value for p in points])

    def has(self, tag: str) -> bool:
        return bool(self.series.get(tag, ((), ()))[0])

    def expert_load(self):
        """[intervals, layers, experts] load fractions over the common steps, and the steps."""
        import numpy as np

        cells = {tuple(int(g) for g in m.groups()): tag
                 for tag in self.series if (m := _EXPERT.match(tag))}
        if not cells:
            return None, []
        layers = max(layer for layer, _ in cells)
        experts = max(expert for _, expert in cells) + 1
        steps = sorted(set.intersection(*(set(self.series[t][0]) for t in cells.values())))
        load = np.full((len(steps), layers, experts), np.nan)
        index = {step: i for i, step in enumerate(steps)}
        for (layer, expert), tag in cells.items():
            for step, value in zip(*self.series[tag]):
                if step in index:
                    load[index[step], layer - 1, expert] = value
        return load, steps


def find_runs(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) that hold TensorBoard event files."""
    return sorted({path.parent for path in root.rglob(EVENTS_GLOB) if path.is_file()})


def _figure(rows: int = 1, cols: int = 1, size=(7.0, 4.0)):
    plt = pyplot("the run's plots", required=True)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return plt, fig, axes[0]


def _iterations(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(run: Run, out: Path) -> Path | str:
    if not run.has("lm loss"):
        return "no 'lm loss' scalars"
    plt, fig, (ax,) = _figure()
    ax.plot(*run.series["lm loss"], label="train", linewidth=1.2)
    if run.has("validation/lm loss"):
        ax.plot(*run.series["validation/lm loss"], "o-", label="validation")
    _iterations(ax)
    ax.set_ylabel("lm loss")
    ax.set_title("loss")
    ax.legend()
    return _save(plt, fig, out / "loss.png")


def plot_throughput(run: Run, out: Path) -> Path | str:
    present = [tag for tag in ("tokens/s", "tflops-per-rank") if run.has(tag)]
    if not present:
        return "no 'tokens/s' or 'tflops-per-rank' scalars"
    for tag in {"tokens/s", "tflops-per-rank"} - set(present):
        print(f"note: throughput.png without {tag}: the run did not log it")
    plt, fig, axes = _figure(1, len(present), size=(5.5 * len(present), 4.0))
    labels = {"tokens/s": "tokens/s (whole job)", "tflops-per-rank": "model TFLOP/s per rank"}
    for ax, tag, color in zip(axes, present, ("tab:blue", "tab:orange")):
        ax.plot(*run.series[tag], color=color, linewidth=1.2)
        _iterations(ax)
        ax.set_ylabel(labels[tag])
        ax.set_title(labels[tag])
    return _save(plt, fig, out / "throughput.png")


def plot_expert_load(run: Run, out: Path) -> Path | str:
    import numpy as np

    load, steps = run.expert_load()
    if load is None or not steps:
        return "no 'expert-load/layerL/expertE' scalars"
    experts = load.shape[2]
    relative = load * experts  # 1.0 = a perfectly balanced share
    panels = [(np.nanmean(relative, axis=0), f"mean over {len(steps)} log intervals"),
              (relative[-1], f"last log interval (iteration {steps[-1]})")]
    with_curve = run.has("expert-load/max-over-mean")
    plt, fig, axes = _figure(1, 2 + with_curve, size=(5.2 * (2 + with_curve), 3.2 + 0.25 *
                                                         load.shape[1]))
    top = max(2.0, float(np.nanmax(relative)))
    for ax, (grid, title) in zip(axes, panels):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(experts))
        ax.set_yticks(range(grid.shape[0]), [str(i + 1) for i in range(grid.shape[0])])
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, label="load ÷ balanced share")
    if with_curve:
        axes[2].plot(*run.series["expert-load/max-over-mean"], color="tab:red")
        axes[2].axhline(1.0, color="gray", linestyle=":")
        _iterations(axes[2])
        axes[2].set_title("busiest expert ÷ mean (mean over layers)", fontsize=9)
    fig.suptitle("expert load")
    return _save(plt, fig, out / "expert_load.png")


def plot_link_bytes(run: Run, out: Path) -> Path | str:
    totals = [(tag, link) for link in ("intra", "inter")
              if run.has(tag := f"moe-comm/{link}-bytes-per-step")]
    if not totals:
        return "no 'moe-comm/{intra,inter}-bytes-per-step' scalars"
    layers = {}
    for tag in run.series:
        if (m := _LAYER_BYTES.match(tag)) and run.has(tag):
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = run.series[tag][1][-1] / 1e6
    plt, fig, axes = _figure(1, 1 + bool(layers), size=(6.0 * (1 + bool(layers)), 4.0))
    for tag, link in totals:
        steps, values = run.series[tag]
        axes[0].plot(steps, [v / 1e6 for v in values], label=f"{link}-node", linewidth=1.2)
    _iterations(axes[0])
    axes[0].set_ylabel("MB per step (all ranks)")
    axes[0].set_title("MoE dispatcher traffic")
    axes[0].legend()
    if layers:
        import numpy as np

        order = sorted(layers)
        x = np.arange(len(order))
        for offset, link in ((-0.2, "intra"), (0.2, "inter")):
            axes[1].bar(x + offset, [layers[l].get(link, 0.0) for l in order], width=0.4,
                        label=f"{link}-node")
        axes[1].set_xticks(x, [f"L{l}" for l in order])
        axes[1].set_ylabel("MB per step")
        axes[1].set_title("per layer, last log interval")
        axes[1].legend()
    return _save(plt, fig, out / "link_bytes.png")


PLOTS = (plot_loss, plot_throughput, plot_expert_load, plot_link_bytes)


def plot_run(directory: Path, out: Path) -> list[Path]:
    """All plots of one run directory; prints a note for each one it skips."""
    run = Run(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in PLOTS:
        result = plot(run, out)
        if isinstance(result, Path):
            written.append(result)
            print(f"wrote {result}")
        else:
            name = plot.__name__.removeprefix("plot_")
            print(f"note: skipping {name}.png: {result} in {directory}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--tensorboard-dir", required=True, type=Path,
                        help="the run's --tensorboard-dir (or a folder of runs)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    args = parser.parse_args(argv)
    runs = find_runs(args.tensorboard_dir) if args.tensorboard_dir.is_dir() else []
    if not runs:
        print(f"error: no TensorBoard event files ({EVENTS_GLOB}) under "
              f"{args.tensorboard_dir}; pass the --tensorboard-dir of a training run",
              file=sys.stderr)
        return 1
    written = []
    for run in runs:
        relative = run.relative_to(args.tensorboard_dir)
        written += plot_run(run, args.out / relative if len(runs) > 1 else args.out)
    if not written:
        print(f"error: nothing to plot: {args.tensorboard_dir} has none of the series above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
