"""The planner's recompute options: ``none``, ``full`` or ``selective:<modules>``.

One string per option, so a :class:`~monta.planner.plan.Candidate` stays a flat, hashable
record; the modules are Megatron-LM's ``--recompute-modules`` (the same choices
``pretrain_moe.py`` takes), sorted and without repeats.
"""

from __future__ import annotations

from monta.training.arguments import RECOMPUTE_MODULES


def selective(*modules: str) -> str:
    """The option for ``--recompute-granularity selective --recompute-modules <modules>``
    (order and repeats do not matter)."""
    return "selective:" + ",".join(sorted(set(modules)))


def parse_recompute(option: str) -> tuple[str, tuple[str, ...]]:
    """(granularity, modules) of an option; ValueError if it names something else."""
    if option in ("none", "full"):
        return option, ()
    granularity, _, listed = option.partition(":")
    modules = tuple(m for m in listed.split(",") if m)
    if granularity != "selective" or not modules or set(modules) - set(RECOMPUTE_MODULES):
        raise ValueError(f"recompute must be none, full or selective:<modules> with modules "
                         f"from {', '.join(RECOMPUTE_MODULES)}, got {option!r}")
    return granularity, tuple(sorted(set(modules)))


def recompute_of_args(args) -> str:
    """The option of parsed ``--recompute-*`` flags (selective with no modules named:
    megatron's default, ``core_attn``)."""
    granularity = getattr(args, "recompute_granularity", None)
    if granularity == "selective":
        return selective(*(getattr(args, "recompute_modules", None) or ["core_attn"]))
    return "full" if granularity == "full" else "none"


def recompute_settings(option: str) -> dict:
    """The ``pretrain_moe.py`` arguments an option runs as, by argparse name (``full`` as one
    layer per uniform unit); empty for ``none``."""
    granularity, modules = parse_recompute(option)
    if granularity == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    if granularity == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(modules)}
    return {}
