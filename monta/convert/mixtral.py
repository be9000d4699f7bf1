"""HF Mixtral tensors ↔ MoNTA checkpoint tensors: names and transforms.

A MoNTA (megatron-core ``torch_dist``) checkpoint stores each tensor once, *unsharded*, under a
layout-free key; layers and experts are leading axes. Shapes (L layers, E experts, H hidden,
F expert ffn, N query heads, G query groups (= KV heads), D head dim, V vocabulary, Vp padded)::

    embedding.word_embeddings.weight                              [Vp, H]
    decoder.layers.self_attention.linear_qkv.layer_norm_weight    [L, H]     input_layernorm
    decoder.layers.self_attention.linear_qkv.weight               [L, (N+2G)·D, H]
    decoder.layers.self_attention.linear_proj.weight              [L, H, N·D]
    decoder.layers.mlp.linear_fc1.layer_norm_weight               [L, H]     post-attention norm
    decoder.layers.mlp.router.weight                              [L, E, H]
    decoder.layers.mlp.experts.experts.linear_fc1.weight          [L, E, 2F, H]
    decoder.layers.mlp.experts.experts.linear_fc2.weight          [L, E, H, F]
    decoder.final_layernorm.weight                                [H]
    output_layer.weight                                           [Vp, H]

Transforms:
  1) ``linear_qkv`` rows are grouped per query group, ``[q_g0 (N/G·D); k_g0 (D); v_g0 (D);
     q_g1; ...]`` (megatron-core's ``SelfAttention.get_query_key_value_tensors`` views them as
     ``[G, (N/G + 2)·D]``); HF keeps ``q_proj [N·D, H]``, ``k_proj``/``v_proj [G·D, H]``. Query
     head ``i`` belongs to group ``i // (N/G)`` in both (HF's ``repeat_kv``), so ``o_proj`` maps
     to ``linear_proj`` unchanged.
  2) ``linear_fc1`` of an expert is ``[gate; up] = [w1; w3]`` (``[2F, H]``); ``w2`` is
     ``linear_fc2``.
  3) the vocabulary is padded with zero rows to ``Vp`` (a multiple of 128·TP); export strips them.
RoPE needs no permutation: HF's ``rotate_half`` and megatron's non-interleaved RoPE agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from monta.convert import hf_config

# MoNTA checkpoint keys.
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
INPUT_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
PRE_MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
ROUTER = "decoder.layers.mlp.router.weight"
FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
VOCAB_KEYS = (EMBEDDING, OUTPUT)

# HF names (the on-disk ones; transformers 5 fuses experts only in memory).
_HF_LAYER = "model.layers.{l}."
_HF_DIRECT = {  # MoNTA key → HF name, same tensor
    FINAL_NORM: "model.norm.weight",
    INPUT_NORM: _HF_LAYER + "input_layernorm.weight",
    PROJ: _HF_LAYER + "self_attn.o_proj.weight",
    PRE_MLP_NORM: _HF_LAYER + "post_attention_layernorm.weight",
    ROUTER: _HF_LAYER + "block_sparse_moe.gate.weight",
    FC2: _HF_LAYER + "block_sparse_moe.experts.{e}.w2.weight",
}
HF_EMBEDDING, HF_LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
_HF_Q, _HF_K, _HF_V = (_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv")
_HF_W1, _HF_W3 = (_HF_LAYER + "block_sparse_moe.experts.{e}." + w + ".weight"
                  for w in ("w1", "w3"))

Region = tuple[slice, ...]
# Reads ``region`` of the HF tensor ``name`` (only that region is loaded).
HFGetter = Callable[[str, Region], torch.Tensor]


@dataclass(frozen=True)
class MixtralDims:
    """The sizes that fix every tensor shape."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    ffn_hidden_size: int
    num_experts: int
    vocab_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    @property
    def group_rows(self) -> int:
        """Rows of one query group in ``linear_qkv``: its query heads, one key, one value."""
        return (self.heads_per_group + 2) * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "MixtralDims":
        heads = int(config["num_attention_heads"])
        return cls(num_layers=int(config["num_hidden_layers"]),
                   hidden_size=int(config["hidden_size"]), num_heads=heads,
                   num_groups=int(config.get("num_key_value_heads") or heads),
                   head_dim=hf_config.head_dim(config),
                   ffn_hidden_size=int(config["intermediate_size"]),
                   num_experts=int(config["num_local_experts"]),
                   vocab_size=int(config["vocab_size"]))

    @classmethod
    def from_args(cls, args: Mapping[str, Any], vocab_size: int) -> "MixtralDims":
        heads, hidden = int(args["num_attention_heads"]), int(args["hidden_size"])
        groups = (int(args["num_query_groups"]) if args.get("group_query_attention")
                  and args.get("num_query_groups") else heads)
        return cls(num_layers=int(args["num_layers"]), hidden_size=hidden, num_heads=heads,
                   num_groups=groups, head_dim=int(args.get("kv_channels") or hidden // heads),
                   ffn_hidden_size=int(args["ffn_hidden_size"]),
                   num_experts=int(args["num_experts"]), vocab_size=vocab_size)

    def monta_shapes(self, padded_vocab: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """MoNTA key → (leading layer/expert axes, per-item shape)."""
        L, E, H, F = self.num_layers, self.num_experts, self.hidden_size, self.ffn_hidden_size
        return {
            EMBEDDING: ((), (padded_vocab, H)),
            INPUT_NORM: ((L,), (H,)),
            QKV: ((L,), (self.num_groups * self.group_rows, H)),
            PROJ: ((L,), (H, self.num_heads * self.head_dim)),
            PRE_MLP_NORM: ((L,), (H,)),
            ROUTER: ((L,), (E, H)),
            FC1: ((L, E), (2 * F, H)),
            FC2: ((L, E), (H, F)),
            FINAL_NORM: ((), (H,)),
            OUTPUT: ((), (padded_vocab, H)),
        }

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor name → shape, in file order (embeddings, layers, norm, head)."""
        return {name: shape for item in export_plan(self) for name, shape in item.hf}


# ----------------------------------------------------------------------------- HF → MoNTA


def _rows(region: Region) -> tuple[int, int]:
    return region[0].start, region[0].stop


def read_monta_region(dims: MixtralDims, key: str, index: tuple[int, ...], region: Region,
                      get: HFGetter) -> torch.Tensor:
    """The ``region`` of MoNTA tensor ``key[index]``, built from HF tensors read by ``get``.

    Args:
        key: a MoNTA checkpoint key (see the module docstring).
        index: the leading layer (and expert) indices, e.g. ``(l,)`` or ``(l, e)``.
        region: one ``slice`` per remaining axis, with explicit start and stop.
        get: reads a region of an HF tensor; only what this region needs is requested.
    """
    l, e = (index + (None, None))[:2]
    cols = region[1:]
    if key in VOCAB_KEYS:
        # 3) rows below the real vocabulary come from HF, the padding rows are zeros
        a, b = _rows(region)
        real = min(b, dims.vocab_size)
        name = HF_EMBEDDING if key == EMBEDDING else HF_LM_HEAD
        parts = [get(name, (slice(a, real), *cols))] if real > a else []
        if b > max(a, real):
            width = parts[0].shape[1] if parts else _width(cols, dims.hidden_size)
            dtype = parts[0].dtype if parts else torch.float32
            parts.append(torch.zeros(b - max(a, real), width, dtype=dtype))
        return torch.cat(parts)
    if key == QKV:
        # 1) assemble the groups this region touches, [q_g; k_g; v_g] each, then cut
        a, b = _rows(region)
        g0, g1 = a // dims.group_rows, -(-b // dims.group_rows)
        q_rows, d = dims.heads_per_group * dims.head_dim, dims.head_dim
        q = get(_HF_Q.format(l=l), (slice(g0 * q_rows, g1 * q_rows), *cols))
        k = get(_HF_K.format(l=l), (slice(g0 * d, g1 * d), *cols))
        v = get(_HF_V.format(l=l), (slice(g0 * d, g1 * d), *cols))
        groups = [torch.cat([q[i * q_rows:(i + 1) * q_rows], k[i * d:(i + 1) * d],
                             v[i * d:(i + 1) * d]]) for i in range(g1 - g0)]
        start = a - g0 * dims.group_rows
        return torch.cat(groups)[start:start + (b - a)]
    if key == FC1:
        # 2) rows [0, F) are w1 (gate), rows [F, 2F) are w3 (up)
        a, b = _rows(region)
        F = dims.ffn_hidden_size
        parts = []
        if a < F:
            parts.append(get(_HF_W1.format(l=l, e=e), (slice(a, min(b, F)), *cols)))
        if b > F:
            parts.append(get(_HF_W3.format(l=l, e=e), (slice(max(a, F) - F, b - F), *cols)))
        return torch.cat(parts)
    if key in _HF_DIRECT:
        return get(_HF_DIRECT[key].format(l=l, e=e), region)
    raise KeyError(f"no HF Mixtral tensor maps to MoNTA tensor {key!r}")


def _width(cols: Region, full: int) -> int:
    return (cols[0].stop - cols[0].start) if cols else full


# ----------------------------------------------------------------------------- MoNTA → HF


@dataclass(frozen=True)
class ExportItem:
    """One MoNTA tensor ``key[index]`` and the HF tensors made from it."""

    key: str
    index: tuple[int, ...]
    hf: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) in file order


def export_plan(dims: MixtralDims) -> list[ExportItem]:
    """Every MoNTA tensor to read for an HF export, in HF file order."""
    H, F, D = dims.hidden_size, dims.ffn_hidden_size, dims.head_dim
    V = dims.vocab_size
    items = [ExportItem(EMBEDDING, (), ((HF_EMBEDDING, (V, H)),))]
    for l in range(dims.num_layers):
        items += [
            ExportItem(INPUT_NORM, (l,), ((_HF_DIRECT[INPUT_NORM].format(l=l), (H,)),)),
            ExportItem(QKV, (l,), ((_HF_Q.format(l=l), (dims.num_heads * D, H)),
                                   (_HF_K.format(l=l), (dims.num_groups * D, H)),
                                   (_HF_V.format(l=l), (dims.num_groups * D, H)))),
            ExportItem(PROJ, (l,), ((_HF_DIRECT[PROJ].format(l=l), (H, dims.num_heads * D)),)),
            ExportItem(PRE_MLP_NORM, (l,), ((_HF_DIRECT[PRE_MLP_NORM].format(l=l), (H,)),)),
            ExportItem(ROUTER, (l,), ((_HF_DIRECT[ROUTER].format(l=l), (dims.num_experts, H)),)),
        ]
        for e in range(dims.num_experts):
            items += [
                ExportItem(FC1, (l, e), ((_HF_W1.format(l=l, e=e), (F, H)),
                                         (_HF_W3.format(l=l, e=e), (F, H)))),
                ExportItem(FC2, (l, e), ((_HF_DIRECT[FC2].format(l=l, e=e), (H, F)),)),
            ]
    items += [ExportItem(FINAL_NORM, (), (("model.norm.weight", (H,)),)),
              ExportItem(OUTPUT, (), ((HF_LM_HEAD, (V, H)),))]
    return items


def to_hf(dims: MixtralDims, item: ExportItem, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Split one full MoNTA tensor into ``item.hf``'s tensors (same order)."""
    if item.key in VOCAB_KEYS:
        return [tensor[:dims.vocab_size]]  # 3) strip the padding rows
    if item.key == QKV:
        # 1) [G·(N/G+2)·D, H] -> [G, N/G+2, D, H] -> q [N·D, H], k, v [G·D, H]
        grouped = tensor.view(dims.num_groups, dims.heads_per_group + 2, dims.head_dim, -1)
        q = grouped[:, :dims.heads_per_group].reshape(dims.num_heads * dims.head_dim, -1)
        k = grouped[:, dims.heads_per_group].reshape(dims.num_groups * dims.head_dim, -1)
        v = grouped[:, dims.heads_per_group + 1].reshape(dims.num_groups * dims.head_dim, -1)
        return [q, k, v]
    if item.key == FC1:
        return list(torch.chunk(tensor, 2, dim=0))  # 2) [w1; w3]
    return [tensor]
