"""Weights & Biases logging with Megatron-LM's flags (--wandb-project, --wandb-exp-name,
--wandb-save-dir), on the reporting rank only.

``wandb`` is optional and not in requirements.txt: without it, ``--wandb-project`` prints one
warning and training goes on. ``WANDB_MODE=offline`` (or ``disabled``) is passed to
``wandb.init`` as its ``mode``, so runs on nodes without internet can be synced later.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

_CONFIG_TYPES = (bool, int, float, str, list, tuple, type(None))


class WandbWriter:
    """``add_scalar(tag, value, step)`` like TensorBoard's writer; one ``run.log`` per step.

    Scalars of the same iteration are gathered into one dict, so W&B gets one row per step
    rather than one per metric.
    """

    def __init__(self, run):
        self.run = run
        self._step: int | None = None
        self._row: dict[str, float] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        self._row[tag] = value

    def flush(self) -> None:
        if self._row:
            self.run.log(self._row, step=self._step)
        self._row = {}

    def close(self) -> None:
        self.flush()
        self.run.finish()


def open_wandb(args: argparse.Namespace, warn: Callable[[str], None]) -> WandbWriter | None:
    """A writer when ``--wandb-project`` is given and ``wandb`` imports, else None.

    The run's directory is ``--wandb-save-dir``, else ``{--save}/wandb`` (Megatron-LM's
    default), else wandb's own default (./wandb).
    """
    if not getattr(args, "wandb_project", None):
        return None
    try:
        import wandb
    except ImportError:
        warn(f" warning: --wandb-project {args.wandb_project} given but wandb is not installed "
             f"(pip install wandb); continuing without Weights & Biases")
        return None
    save_dir = args.wandb_save_dir or (os.path.join(args.save, "wandb") if args.save else None)
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    kwargs = {"project": args.wandb_project, "name": args.wandb_exp_name, "dir": save_dir,
              # the flags as the run's config; only plain values (W&B serialises them)
              "config": {k: v for k, v in vars(args).items() if isinstance(v, _CONFIG_TYPES)}}
    if os.environ.get("WANDB_MODE"):
        kwargs["mode"] = os.environ["WANDB_MODE"]
    return WandbWriter(wandb.init(**kwargs))
