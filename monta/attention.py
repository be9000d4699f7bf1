"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash kernels).

Without Transformer Engine, megatron-core's local spec computes attention with
``DotProductAttention``: it materialises the ``[b·heads, s, s]`` score matrix, runs an unfused
softmax over it and multiplies again — several passes over ``b·heads·s²`` elements per layer,
forward and backward, which at s = 2048 costs more than the model's projections. PyTorch's SDPA
runs FlashAttention-2 on Ampere/Hopper (causal, bf16) without materialising the scores.

:class:`SDPAttention` is a ``DotProductAttention`` (same constructor, same tensor layout
``[s, b, heads, head_dim]`` in, ``[s, b, heads·head_dim]`` out, no parameters), used by
:func:`monta.model.gpt_moe_layer_spec` on GPUs without TE when :func:`sdpa_applies`; any call it
does not cover (an explicit mask, another mask type, packed sequences) goes to the parent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import is_torch_min_version


_NATIVE_GQA = is_torch_min_version("2.5.0a0")  # SDPA's enable_gqa


def sdpa_applies(config, on_gpu: bool | None = None) -> bool:
    """Whether the model's attention is plain causal softmax attention SDPA computes as is."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    return (on_gpu and config.context_parallel_size == 1 and config.window_size is None
            and getattr(config, "softmax_type", "vanilla") == "vanilla"
            # this rescales the scores by the layer number inside megatron's softmax
            and not config.apply_query_key_layer_scaling)


class SDPAttention(DotProductAttention):
    """Causal attention via SDPA; see the module docstring."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if (attention_mask is not None or mask_type != AttnMaskType.causal
                or attention_bias is not None or packed_seq_params is not None
                or query.size(0) != key.size(0)):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        # GQA: query head i reads key/value group i // (heads / groups), as in megatron. SDPA
        # does that itself (enable_gqa) instead of copying key and value per query head: on an
        # H200 (cuDNN's kernels either way) attention forward + backward at 16 heads, 4
        # groups, 16 × 2048 tokens took 2.55 instead of 3.02 ms (scratch probe, interleaved).
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        extra = {}
        if repeat > 1 and _NATIVE_GQA:
            extra["enable_gqa"] = True
        elif repeat > 1:
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        # [s, b, heads, d] -> [b, heads, s, d] (views; SDPA only needs the last dim contiguous)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        if dropout > 0 and not self.config.sequence_parallel:
            # megatron draws attention dropout from the tensor-parallel RNG stream
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout,
                                                         is_causal=True, scale=self.softmax_scale,
                                                         **extra)
        else:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                     scale=self.softmax_scale, **extra)
        # [b, heads, s, d] -> [s, b, heads·d]
        return context.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)
