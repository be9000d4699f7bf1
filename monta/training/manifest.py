"""Checkpoint manifests: what a complete checkpoint holds, so a torn or corrupted one is caught.

``iter_N/manifest.json`` lists every file of the checkpoint with its size and sha256, and the
iteration. It is written last — after every rank's shards are on disk and hashed, before the
directory is renamed into place and the tracker updated — so its presence means "complete" and
its contents say what "intact" means::

    {"format": "monta-checkpoint-manifest", "version": 1, "iteration": 8, "world_size": 4,
     "files": {"__0_0.distcp": {"size": 1048576, "sha256": "9f86d0..."}, ...}}

Hashing is spread over ranks (file i of the sorted listing by rank i mod world), both when saving
and when verifying at ``--load``, so no rank reads the whole checkpoint. Checkpoints without a
manifest (written by Megatron-LM or before manifests existed) still load, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

MANIFEST_FILENAME = "manifest.json"
MANIFEST_FORMAT = "monta-checkpoint-manifest"
MANIFEST_VERSION = 1
_CHUNK_BYTES = 1 << 20


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(path: str) -> list[str]:
    """Names of the files a manifest covers: every regular file but the manifest, sorted."""
    return sorted(name for name in os.listdir(path)
                  if name != MANIFEST_FILENAME and os.path.isfile(os.path.join(path, name)))


def share(names: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's part of the hashing work: every ``world_size``-th file from ``rank``."""
    return names[rank::world_size]


def hash_files(path: str, names: list[str]) -> dict[str, dict]:
    """``{name: {"size", "sha256"}}`` for ``names`` under ``path``."""
    return {name: {"size": os.path.getsize(os.path.join(path, name)),
                   "sha256": sha256_file(os.path.join(path, name))} for name in names}


def write_manifest(path: str, iteration: int, world_size: int, files: dict[str, dict]) -> None:
    """Write ``path/manifest.json`` durably (temp file, fsync, rename)."""
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "iteration": iteration,
                "world_size": world_size, "files": dict(sorted(files.items()))}
    tmp = os.path.join(path, MANIFEST_FILENAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST_FILENAME))


@dataclass
class Verdict:
    """What :func:`verify` found; ``problems`` is empty for a good checkpoint."""

    path: str
    problems: list[str] = field(default_factory=list)
    has_manifest: bool = True
    iteration: int | None = None
    num_files: int = 0
    num_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        name = os.path.basename(os.path.normpath(self.path))
        if not self.ok:
            return f"{name} FAIL: {'; '.join(self.problems)}"
        if not self.has_manifest:
            return f"{name} OK (no manifest: only file presence checked)"
        return (f"{name} OK (iteration {self.iteration}, {self.num_files} files, "
                f"{self.num_bytes / 1e6:.1f} MB, sha256 verified)")


def read_manifest(path: str) -> dict:
    """The parsed manifest; ValueError on anything unexpected."""
    file = os.path.join(path, MANIFEST_FILENAME)
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{MANIFEST_FILENAME} unreadable ({error})") from error
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), dict)):
        raise ValueError(f"{MANIFEST_FILENAME} is not a {MANIFEST_FORMAT}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{MANIFEST_FILENAME} has version {manifest.get('version')}, this MoNTA "
                         f"reads {MANIFEST_VERSION}")
    return manifest


def verify(path: str, hash_share: tuple[int, int] | None = (0, 1),
           expected_iteration: int | None = None) -> Verdict:
    """Check a checkpoint directory against its manifest (local file reads only).

    Args:
        path: an ``iter_N`` directory.
        hash_share: ``(rank, world_size)``: hash only that rank's :func:`share` of the files;
            ``(0, 1)`` hashes all, None none (sizes and presence only: the cheap check).
        expected_iteration: the N of ``iter_N``, compared with the manifest's.
    """
    verdict = Verdict(path)
    if not os.path.isdir(path):
        verdict.problems.append("directory missing")
        return verdict
    present = checkpoint_files(path)
    if not os.path.isfile(os.path.join(path, MANIFEST_FILENAME)):
        verdict.has_manifest = False
        for required in ("metadata.json", "common.pt"):
            file = os.path.join(path, required)
            if not os.path.isfile(file) or os.path.getsize(file) == 0:
                verdict.problems.append(f"{required} missing or empty")
        if not any(name.endswith(".distcp") for name in present):
            verdict.problems.append("no tensor shards (*.distcp)")
        return verdict
    try:
        manifest = read_manifest(path)
    except ValueError as error:
        verdict.problems.append(str(error))
        return verdict
    listed: dict[str, dict] = manifest["files"]
    verdict.iteration = manifest.get("iteration")
    verdict.num_files = len(listed)
    verdict.num_bytes = sum(int(entry.get("size", 0)) for entry in listed.values())
    if expected_iteration is not None and verdict.iteration != expected_iteration:
        verdict.problems.append(f"manifest is for iteration {verdict.iteration}, the directory "
                                f"for {expected_iteration}")
    for name, entry in listed.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            verdict.problems.append(f"{name} missing")
        elif os.path.getsize(file) != entry["size"]:
            verdict.problems.append(f"{name} is {os.path.getsize(file)} bytes, the manifest says "
                                    f"{entry['size']} (truncated or overwritten)")
    extra = sorted(set(present) - set(listed))
    if extra:
        verdict.problems.append(f"files not in the manifest: {', '.join(extra[:5])}")
    if hash_share is not None and not verdict.problems:
        for name in share(sorted(listed), *hash_share):
            found = sha256_file(os.path.join(path, name))
            if found != listed[name]["sha256"]:
                verdict.problems.append(f"{name}: sha256 mismatch (manifest "
                                        f"{listed[name]['sha256'][:12]}…, file {found[:12]}…)")
    return verdict
