"""Checkpoint manifests, the --load plan (fallback), --keep-last pruning and checkpoint_verify.py,
on synthetic checkpoint directories (local files only; the fault drill covers real jobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from monta.training import manifest
from monta.training.checkpointing import CheckpointError, _prune, find_checkpoint
from monta.training.load_plan import plan_load

from tests.conftest import REPO


def make_checkpoint(root, iteration: int, with_manifest: bool = True):
    """An ``iter_N`` directory shaped like a torch_dist checkpoint, with a manifest."""
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    for name, size in (("metadata.json", 40), ("common.pt", 300), (".metadata", 120),
                       ("__0_0.distcp", 5000), ("__1_0.distcp", 4096)):
        (path / name).write_bytes(bytes((iteration * 7 + i) % 256 for i in range(size)))
    if with_manifest:
        names = manifest.checkpoint_files(str(path))
        manifest.write_manifest(str(path), iteration, 2, manifest.hash_files(str(path), names))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return path


def flip(path, offset: int = 100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    path = make_checkpoint(tmp_path, 4)
    written = json.loads((path / "manifest.json").read_text())
    assert written["iteration"] == 4 and written["format"] == manifest.MANIFEST_FORMAT
    assert sorted(written["files"]) == sorted(
        n for n in os.listdir(path) if n != "manifest.json")
    assert written["files"]["__0_0.distcp"]["size"] == 5000
    assert manifest.verify(str(path), expected_iteration=4).ok


@pytest.mark.parametrize("damage, problem", [
    (lambda p: flip(p / "__1_0.distcp"), "__1_0.distcp: sha256 mismatch"),
    (lambda p: (p / "__0_0.distcp").write_bytes(b"short"), "__0_0.distcp is 5 bytes"),
    (lambda p: (p / "common.pt").unlink(), "common.pt missing"),
    (lambda p: (p / "__9_0.distcp").write_bytes(b"x"), "files not in the manifest: __9_0"),
    (lambda p: (p / "manifest.json").write_text("{"), "manifest.json unreadable"),
])
def test_damage_is_found(tmp_path, damage, problem):
    path = make_checkpoint(tmp_path, 4)
    damage(path)
    verdict = manifest.verify(str(path))
    assert not verdict.ok and problem in "; ".join(verdict.problems), verdict.problems


def test_cheap_check_skips_hashes_and_shares_cover_every_file(tmp_path):
    path = make_checkpoint(tmp_path, 4)
    flip(path / "__1_0.distcp")
    assert manifest.verify(str(path), hash_share=None).ok  # sizes only: a bit flip passes
    verdicts = [manifest.verify(str(path), hash_share=(r, 3)) for r in range(3)]
    assert sum(not v.ok for v in verdicts) == 1  # exactly the rank hashing that file sees it
    names = manifest.checkpoint_files(str(path))
    shares = [manifest.share(names, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == names


def test_checkpoint_without_manifest_is_checked_for_its_files(tmp_path):
    path = make_checkpoint(tmp_path, 4, with_manifest=False)
    assert manifest.verify(str(path)).ok and not manifest.verify(str(path)).has_manifest
    (path / "metadata.json").unlink()
    assert "metadata.json missing or empty" in manifest.verify(str(path)).problems


def test_plan_lists_newest_first_and_falls_back_past_a_torn_one(tmp_path):
    for i in (2, 4, 6):
        make_checkpoint(tmp_path, i)
    (tmp_path / "iter_0000006" / "__0_0.distcp").write_bytes(b"torn")
    plan = plan_load(str(tmp_path), required=True, fallback=True)
    assert plan.candidates == [str(tmp_path / "iter_0000004"), str(tmp_path / "iter_0000002")]
    assert "iter_0000006" in plan.rejected[0] and "__0_0.distcp is 4 bytes" in plan.rejected[0]


def test_no_fallback_refuses_a_torn_newest(tmp_path):
    for i in (2, 4):
        make_checkpoint(tmp_path, i)
    (tmp_path / "iter_0000004" / "__0_0.distcp").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="iter_0000004 is incomplete or corrupt.*"
                                              "--no-load-fallback"):
        plan_load(str(tmp_path), required=True, fallback=False)


def test_plan_ignores_checkpoints_newer_than_the_tracker_and_tmp_dirs(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 8)
    (tmp_path / "iter_0000010.tmp").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    plan = plan_load(str(tmp_path), required=True, fallback=True)
    assert plan.candidates == [str(tmp_path / "iter_0000002")]
    assert find_checkpoint(str(tmp_path), required=True) == str(tmp_path / "iter_0000002")


def test_stale_tracker_falls_back_or_fails_clearly(tmp_path):
    make_checkpoint(tmp_path, 2)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("40")
    plan = plan_load(str(tmp_path), required=True, fallback=True)
    assert plan.candidates == [str(tmp_path / "iter_0000002")]
    assert "iter_0000040" in plan.rejected[0] and "stale" in plan.rejected[0]
    with pytest.raises(CheckpointError, match="iter_0000040.*stale"):
        plan_load(str(tmp_path), required=True, fallback=False)


def test_explicit_iter_dir_has_no_fallback(tmp_path):
    make_checkpoint(tmp_path, 2)
    path = make_checkpoint(tmp_path, 4)
    assert plan_load(str(path), required=True, fallback=True).candidates == [str(path)]
    (path / "common.pt").unlink()
    with pytest.raises(CheckpointError, match="common.pt missing"):
        plan_load(str(path), required=True, fallback=True)


def test_keep_last_prunes_only_older_checkpoints(tmp_path):
    for i in (2, 4, 6, 8):
        make_checkpoint(tmp_path, i)
    make_checkpoint(tmp_path, 10)
    _prune(str(tmp_path), 8, keep_last=2)  # 10 is newer than the save being pruned for
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "iter_0000006", "iter_0000008", "iter_0000010"]


def test_keep_last_keeps_everything_when_the_new_save_is_damaged(tmp_path):
    for i in (2, 4, 6):
        make_checkpoint(tmp_path, i)
    (tmp_path / "iter_0000006" / "common.pt").unlink()
    _prune(str(tmp_path), 6, keep_last=1)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def run_verify(path):
    return subprocess.run([sys.executable, str(REPO / "tools" / "checkpoint_verify.py"),
                           str(path)], capture_output=True, text=True, timeout=60)


def test_checkpoint_verify_tool(tmp_path):
    for i in (2, 4):
        make_checkpoint(tmp_path, i)
    good = run_verify(tmp_path)
    assert good.returncode == 0, good.stdout
    assert good.stdout.splitlines() == [
        "iter_0000002 OK (iteration 2, 5 files, 0.0 MB, sha256 verified)",
        "iter_0000004 OK (iteration 4, 5 files, 0.0 MB, sha256 verified)"]
    flip(tmp_path / "iter_0000004" / "common.pt")
    bad = run_verify(tmp_path)
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[1].startswith("iter_0000004 FAIL: common.pt: sha256 mismatch")
    assert run_verify(tmp_path / "iter_0000002").returncode == 0
    assert run_verify(tmp_path / "nothing").returncode == 1
