"""``monta.provenance``: the commit a result is stamped with — the caller's word first, then the
package's own work tree, never an enclosing repository's."""

from __future__ import annotations

import subprocess

import pytest

from monta import provenance


def _git(cwd, *args):
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True, timeout=30).stdout.strip()


@pytest.fixture
def work_tree(tmp_path, monkeypatch):
    """A one-commit repository at tmp_path/repo, standing in for the package's parent."""
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "f.txt").write_text("x\n")
    _git(repo, "add", "f.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    return repo


def test_commit_of_the_work_tree_and_its_dirt(work_tree, monkeypatch):
    monkeypatch.setattr(provenance, "REPO", work_tree)
    assert provenance.source_commit() == _git(work_tree, "rev-parse", "HEAD")
    assert provenance.source_dirty() is False
    (work_tree / "f.txt").write_text("y\n")
    assert provenance.source_dirty() is True


def test_the_callers_commit_wins(work_tree, monkeypatch):
    monkeypatch.setattr(provenance, "REPO", work_tree)
    monkeypatch.setenv(provenance.COMMIT_ENV, "0123abcd")
    assert provenance.source_commit() == "0123abcd"
    assert provenance.source_dirty() is None  # git's view of this tree says nothing of it


def test_no_commit_from_an_enclosing_repository_or_none(work_tree, monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "REPO", work_tree / "sub")  # a copy inside another repo
    assert provenance.source_commit() == provenance.UNKNOWN
    assert provenance.source_dirty() is None
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setattr(provenance, "REPO", outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert provenance.source_commit() == provenance.UNKNOWN
