"""A tiny random HF Mixtral, built once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


# Mixtral's structure at toy size: GQA (4 heads, 2 KV heads), 8 experts top-2, untied, vocab
# 300 so that padding (to 384 at TP1, 512 at TP2) is exercised.
TINY_MIXTRAL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                    intermediate_size=128, vocab_size=300, rope_theta=10000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, max_position_embeddings=128)


@dataclass(frozen=True)
class TinyHF:
    dir: Path           # config.json + 8 safetensors shards + index
    input_ids: Path     # [2, 16] int64
    logits: Path        # MixtralForCausalLM's fp32 logits for input_ids, [2, 16, 300]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> TinyHF:
    """Weights drawn at std 0.15 (norms 1 ± 0.2) instead of HF's 0.02 init, so every tensor
    moves the logits well above the comparison tolerance (a wrong mapping cannot hide)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("tiny_hf")
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**TINY_MIXTRAL)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    model.save_pretrained(root / "hf", max_shard_size="200KB")  # 8 shards + index
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY_MIXTRAL["vocab_size"], (2, 16), generator=generator)
    with torch.no_grad():
        logits = model(ids).logits
    np.save(root / "ids.npy", ids.numpy())
    np.save(root / "logits.npy", logits.float().numpy())
    return TinyHF(root / "hf", root / "ids.npy", root / "logits.npy")
