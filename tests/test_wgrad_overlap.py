"""monta/wgrad_overlap.py on CPU: the side stream is a CUDA-only thing, so the overlap turns
itself off, and a bad MONTA_WGRAD_STREAM is refused. tests/gpu/test_gpu_moe.py runs it on a GPU."""

import pytest
import torch

from monta import wgrad_overlap


def test_overlap_is_off_on_cpu_and_changes_nothing(monkeypatch):
    monkeypatch.setenv(wgrad_overlap.VARIABLE, "1")
    x = torch.randn(4, 3)
    overlap = wgrad_overlap.WgradOverlap(x)
    assert not overlap.on
    with overlap.side():
        y = x * 2
    overlap.join(y, None)
    assert torch.equal(y, x * 2)


@pytest.mark.parametrize("value", ["2", "yes", ""])
def test_bad_setting_is_refused(monkeypatch, value):
    monkeypatch.setenv(wgrad_overlap.VARIABLE, value)
    with pytest.raises(ValueError, match="MONTA_WGRAD_STREAM must be one of 0, 1"):
        wgrad_overlap.enabled(torch.zeros(1))
