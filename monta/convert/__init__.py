"""Checkpoint conversion: Hugging Face Mixtral ↔ MoNTA (megatron-core ``torch_dist``), resharding.

Modules, one concept each:
  - :mod:`hf_config`: HF ``config.json`` ↔ MoNTA's model flags.
  - :mod:`mixtral`: tensor names and transforms (fused QKV, stacked gate/up, vocab padding).
  - :mod:`safetensors_io`: reading an HF directory lazily (index, shards, checks), writing one
    shard at a time.
  - :mod:`dcp_reader`: reading any region of a MoNTA checkpoint's tensors on one process.
  - :mod:`job`: the distributed part: build the target layout, fill it, save.
  - :mod:`to_hf`: MoNTA → HF on one process.
  - :mod:`logits`: the forward pass behind ``tools/forward.py``.

The command line is ``tools/convert_checkpoint.py``; docs/conversion.md has the recipes.
"""

from monta.convert.errors import ConversionError

__all__ = ["ConversionError"]
