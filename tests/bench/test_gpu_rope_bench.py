"""bench/gpu_rope.py off the GPU: a clear refusal, and megatron's layout of the angles."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_rope


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_rope.main(["--out", str(tmp_path / "rope.json")])


def test_angles_match_megatrons_rotary_embedding():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    freqs = RotaryEmbedding(kv_channels=64, rotary_percent=1.0,
                            use_cpu_initialization=True).get_freqs_non_repeated(32)
    want = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # its get_emb, on the CPU
    got = gpu_rope.angles(32, 64, torch.device("cpu"))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.float())
