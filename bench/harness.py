"""What a benchmark script does around its measurements: the flags of its output, the header of
its result (which benchmark, when, which commit, which machine, which settings), and writing the
result as JSON with its Markdown tables beside it.

Shared by ``bench/moe_ab.py`` and ``bench/planner_validation.py``, whose ``main`` functions did
all of this the same way, twice; the tables' provenance line (:func:`provenance_line`, also used
by ``bench/dispatch_bytes.py``) reads the same header. Running jobs on the testbed and judging
the host's load is :mod:`bench.testbed_jobs`; nothing here needs the testbed or torch.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable

from monta.provenance import source_commit, source_dirty

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------
def comma_ints(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (an argparse ``type``)."""
    return [int(v) for v in text.split(",") if v.strip()]


def comma_floats(text: str) -> list[float]:
    """``"0.4,1"`` -> ``[0.4, 1.0]`` (an argparse ``type``)."""
    return [float(v) for v in text.split(",") if v.strip()]


def add_output_args(parser: argparse.ArgumentParser, default_out: Path, plot_what: str) -> None:
    """``--out`` (the JSON; the Markdown goes next to it) and ``--plot PNG`` (``plot_what``), as
    :func:`write_result` reads them."""
    parser.add_argument("--out", type=Path, default=default_out,
                        help="JSON path; the Markdown goes next to it (.md)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help=f"{plot_what} (needs matplotlib)")


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": version("torch"),
            "megatron_core": version("megatron-core")}


def result_header(benchmark: str, args: argparse.Namespace,
                  **extra_settings: Any) -> dict[str, Any]:
    """The fields a result starts with: ``benchmark``, ``timestamp`` (UTC, now), ``git_commit``,
    ``git_dirty``, ``machine`` and ``settings`` (every flag, paths as text, then
    ``extra_settings``)."""
    return {
        "benchmark": benchmark,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": source_commit(),
        "git_dirty": source_dirty(),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | extra_settings,
    }


def write_result(tag: str, result: dict[str, Any], args: argparse.Namespace,
                 markdown: Callable[[dict], str], plot: Callable[[dict, Path], str], *,
                 seconds: float, detail: str = "") -> None:
    """Write ``result`` to ``args.out`` and ``markdown(result)`` next to it (``.md``), print the
    tables, draw ``plot(result, args.plot)`` when ``--plot`` was given, and say what was written,
    how long it took and whether the host was quiet (``result["clean"]``, then ``detail``)."""
    table = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table)
    print(table)
    if args.plot:
        print(f"[{tag}] {plot(result, args.plot)}")
    print(f"[{tag}] wrote {args.out} and {args.out.with_suffix('.md')} in {seconds} s "
          f"({'clean' if result['clean'] else 'NOT clean'}{detail})", flush=True)


def provenance_line(meta: dict[str, Any]) -> str:
    """The Markdown line under a result table's title: when, which commit, which machine
    (``meta`` holds ``timestamp``, ``git_commit``, ``git_dirty`` and :func:`machine`'s dict)."""
    m = meta["machine"]
    return (f"{meta['timestamp']} · commit {meta['git_commit'][:10]}"
            f"{' (dirty tree)' if meta['git_dirty'] else ''} · {m['platform']} · "
            f"{m['cpu_count']} CPUs · torch {m['torch']} · megatron-core {m['megatron_core']}")
