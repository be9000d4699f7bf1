"""The shared matplotlib entry: headless backend, and a clear message when it is missing."""

from __future__ import annotations

import sys

import pytest

from monta.plotting import pyplot, skipped


def test_pyplot_is_headless():
    plt = pyplot("x.png")
    assert plt is not None and plt.get_backend().lower() == "agg"


def test_missing_matplotlib_is_skipped_or_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert pyplot("out/plot.png") is None
    with pytest.raises(ImportError, match=r"skipped the plot out/plot\.png .*pip install"):
        pyplot("out/plot.png", required=True)
    assert "out/plot.png" in skipped("out/plot.png")
