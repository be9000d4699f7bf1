"""Which checkpoint ``--load`` resumes from: newest good one first, verified before it is read.

Two steps, so nothing can hang on a bad checkpoint:

1) :func:`plan_load`, in the preflight (no process group yet): the candidates, newest first —
   the tracker's iteration, then older ``iter_N`` directories — each after the cheap local checks
   (files present, sizes as in the manifest). Every rank sees the same files, so every rank
   reaches the same plan or the same error.
2) :func:`choose_checkpoint`, right after the process group exists and before anything reads a
   checkpoint: each rank hashes its share of a candidate's files against the manifest, one
   all-gather pools the findings, and every rank moves on to the next candidate together (with a
   warning) or stops (``--no-load-fallback``). Every rank reaches every all-gather.

A ``--load`` naming one ``iter_N`` directory has no fallback: the user asked for that one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from monta.training import manifest
from monta.training.checkpointing import (
    TRACKER_FILENAME,
    CheckpointError,
    CorruptCheckpointError,
    checkpoint_dir,
    read_tracker,
)
from monta.training.watchdog import PHASE, say


@dataclass
class LoadPlan:
    """Candidates for ``--load``, newest first, that passed the cheap checks."""

    load: str
    candidates: list[str]
    fallback: bool
    rejected: list[str] = field(default_factory=list)
    """``"path: reason"`` for candidates that failed a check, in order."""

    def reject(self, index: int, reason: str) -> None:
        """Drop ``candidates[index]``; raise if that leaves nothing or fallback is off."""
        path = self.candidates.pop(index)
        self.rejected.append(f"{path}: {reason}")
        if not self.fallback:
            raise CorruptCheckpointError(
                f"checkpoint {path} is incomplete or corrupt: {reason}. Load an earlier iter_* "
                f"directory" + (", or drop --no-load-fallback to fall back to the previous good "
                                "one automatically" if self.load != path else ""))
        if not self.candidates:
            raise CorruptCheckpointError(
                f"no loadable checkpoint under --load {self.load}: " + "; ".join(self.rejected))


def _iteration_of(name: str) -> int | None:
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None


def plan_load(load: str, required: bool, fallback: bool) -> LoadPlan | None:
    """Candidates for ``--load`` (local reads only); None for a fresh start.

    Args:
        load: a save root (with a tracker) or one ``iter_N`` directory.
        required: False for ``--load`` equal to ``--save`` (auto-resume: an empty root starts
            fresh).
        fallback: whether older checkpoints may stand in for a bad newest one.

    Raises:
        CheckpointError: nothing to load where something was required, or no candidate
            passes the checks (the message lists why each failed).
    """
    explicit = (os.path.isfile(os.path.join(load, "metadata.json"))
                or os.path.isfile(os.path.join(load, manifest.MANIFEST_FILENAME))
                or (os.path.isdir(load) and _expected(load) is not None))
    if explicit:
        plan = LoadPlan(load, [load], fallback=False)
    else:
        if not os.path.isdir(load) or (iteration := read_tracker(load)) is None:
            if not required:
                return None
            what = "does not exist" if not os.path.isdir(load) else f"has no {TRACKER_FILENAME}"
            raise CheckpointError(f"--load {load} {what}: point it at a directory written by "
                                  f"--save (or drop --load to start from scratch)")
        older = sorted((n for name in os.listdir(load)
                        if (n := _iteration_of(name)) is not None and n < iteration), reverse=True)
        paths = [checkpoint_dir(load, n) for n in [iteration, *(older if fallback else [])]]
        plan = LoadPlan(load, paths, fallback)
    for path in list(plan.candidates):
        verdict = manifest.verify(path, hash_share=None, expected_iteration=_expected(path))
        if not verdict.ok:
            reason = "; ".join(verdict.problems)
            if verdict.problems == ["directory missing"]:
                reason = (f"directory named by {TRACKER_FILENAME} is missing (the tracker is "
                          f"stale)")
            plan.reject(plan.candidates.index(path), reason)
    return plan


def _expected(path: str) -> int | None:
    return _iteration_of(os.path.basename(os.path.normpath(path)))


def _warn(message: str) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        say(f"warning: {message}")


def choose_checkpoint(plan: LoadPlan, check_args=None) -> str:
    """Verify candidates' checksums collectively; the first good one, the same on every rank.

    Args:
        plan: from :func:`plan_load` (the same on every rank).
        check_args: ``f(path)`` re-checking the model flags against a fallback candidate (the
            preflight checked the first one).

    Raises:
        CheckpointError: on every rank, when no candidate verifies or ``--no-load-fallback``
            forbids moving past a bad one.
    """
    import torch.distributed as dist

    PHASE.enter("load")
    for rejected in plan.rejected:
        _warn(f"skipping checkpoint {rejected}")
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, plan.candidates)
    if any(c != plan.candidates for c in counts):
        raise CheckpointError(f"ranks see different checkpoints under --load {plan.load} "
                              f"({sorted({tuple(c) for c in counts})}): is it on a shared file "
                              f"system?")
    rank, world = dist.get_rank(), dist.get_world_size()
    for i, path in enumerate(plan.candidates):
        verdict = manifest.verify(path, hash_share=(rank, world), expected_iteration=_expected(path))
        found: list = [None] * world
        dist.all_gather_object(found, verdict.problems)
        problems = [p for part in found for p in part]
        if not problems:
            if not verdict.has_manifest:
                _warn(f"checkpoint {path} has no {manifest.MANIFEST_FILENAME} (saved by "
                      f"Megatron-LM or an older MoNTA): loading it unverified")
            if i > 0 and check_args is not None:
                check_args(path)
            return path
        if not plan.fallback:
            raise CorruptCheckpointError(
                f"checkpoint {path} failed verification: {'; '.join(problems)}. Load an earlier "
                f"iter_* directory" + (", or drop --no-load-fallback to fall back to the "
                                       "previous good one" if plan.load != path else ""))
        if i + 1 < len(plan.candidates):
            _warn(f"checkpoint {path} failed verification ({'; '.join(problems)}); falling back "
                  f"to {plan.candidates[i + 1]}, the previous checkpoint")
        plan.rejected.append(f"{path}: {'; '.join(problems)}")
    raise CorruptCheckpointError(f"no checkpoint under --load {plan.load} passed verification: "
                                 + "; ".join(plan.rejected))
