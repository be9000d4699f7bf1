"""Check MoNTA checkpoints offline against their manifests (sizes and sha256 of every file).

    python tools/checkpoint_verify.py checkpoints/run1                # every iter_* under a --save
    python tools/checkpoint_verify.py checkpoints/run1/iter_0000100   # one checkpoint

Prints one line per checkpoint (``iter_0000100 OK (...)`` or ``iter_0000100 FAIL: <why>``) and
exits 0 when all pass, 1 otherwise (also when there is nothing to check). Reads files only: no
torch, no process group, safe to run while a job trains (in-progress ``*.tmp`` saves and
``*.old`` deletions are skipped).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monta.training import manifest  # noqa: E402  (pure Python: no torch import)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"


def checkpoints_under(path: str) -> list[str]:
    """``path`` itself if it is one checkpoint, else its ``iter_N`` directories, oldest first."""
    name = os.path.basename(os.path.normpath(path))
    if name.startswith("iter_") and name[5:].isdigit():
        return [path]
    if not os.path.isdir(path):
        return []
    return [os.path.join(path, n) for n in sorted(os.listdir(path))
            if n.startswith("iter_") and n[5:].isdigit()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a --save directory or one iter_* checkpoint directory")
    args = parser.parse_args(argv)
    paths = checkpoints_under(args.path)
    if not paths:
        print(f"{args.path}: no checkpoints (iter_* directories) found")
        return 1
    failed = 0
    for path in paths:
        name = os.path.basename(os.path.normpath(path))
        verdict = manifest.verify(path, hash_share=(0, 1), expected_iteration=int(name[5:]))
        print(verdict.summary())
        failed += not verdict.ok
    tracker = os.path.join(args.path, TRACKER_FILENAME)
    if os.path.isfile(tracker):
        latest = open(tracker).read().strip()
        named = os.path.join(args.path, f"iter_{int(latest):07d}") if latest.isdigit() else None
        if named is None or named not in paths:
            print(f"{TRACKER_FILENAME} names {latest!r}, which is not here")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
