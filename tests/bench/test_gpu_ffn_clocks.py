"""bench/gpu_ffn_clocks.py off the GPU: nvidia-smi's samples parsed, and a clear refusal."""

from __future__ import annotations

import datetime

import pytest
import torch

from bench import gpu_ffn_clocks


def test_samples_parse_and_skip_unavailable_fields():
    text = ("2026/11/30 14:55:44.791, 1665, 671.08, 0x0000000000000004\n"
            "2026/11/30 14:55:44.845, [N/A], 671.08, 0x0000000000000004\n"
            "2026/11/30 14:55:44.900, 1597, 648.50, 0x0000000000000000\n")
    samples = gpu_ffn_clocks.parse_samples(text)
    assert [s[1:] for s in samples] == [(1665.0, 671.08, "0x0000000000000004"),
                                        (1597.0, 648.5, "0x0000000000000000")]
    first = datetime.datetime(2026, 11, 30, 14, 55, 44, 791000).timestamp()
    assert samples[0][0] == pytest.approx(first) and samples[1][0] - samples[0][0] == \
        pytest.approx(0.109, abs=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_ffn_clocks.main(["--out", str(tmp_path / "clocks.json")])
