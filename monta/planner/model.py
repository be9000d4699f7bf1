"""Model and workload specs: what is trained, on how many tokens per step.

A :class:`ModelSpec` comes from an HF Mixtral-style ``config.json`` (a path, a model directory
or a preset in ``monta/planner/presets/models/``) or from ``pretrain_moe.py`` flags
(:func:`model_from_args`). Parameter counts follow megatron-core's GPT-MoE layer: attention
(QKV + output projection, no bias), two RMSNorms, a router and E SwiGLU experts per layer,
embedding and untied output layer padded to a multiple of 128 · TP.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

MODEL_PRESET_DIR = Path(__file__).resolve().parent / "presets" / "models"
_HF_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_local_experts", "num_experts_per_tok", "vocab_size")


@dataclass(frozen=True)
class ModelSpec:
    """A GPT Mixture-of-Experts model (every layer an MoE layer, as in Mixtral)."""

    num_layers: int
    """Transformer layers, L."""
    hidden_size: int
    """h."""
    ffn_hidden_size: int
    """Each expert's intermediate size (SwiGLU: gate and up are each this wide)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA); equal to the heads without GQA."""
    num_experts: int
    """E."""
    topk: int
    """k experts per token."""
    vocab_size: int
    """Tokenizer vocabulary (padded per TP like megatron when counted)."""
    kv_channels: int | None = None
    """Head dimension; default h / heads."""
    swiglu: bool = True
    """Gated experts (3 matrices) instead of 2."""
    untie_embeddings: bool = True
    """Separate output layer (Mixtral); False ties it to the embedding."""
    name: str = "model"
    """Label for tables."""
    make_vocab_size_divisible_by: int = 128
    """megatron pads the vocabulary to a multiple of this × TP."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "num_experts", "topk", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk {self.topk} must be in 1..num_experts {self.num_experts}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible "
                             f"by num_query_groups {self.num_query_groups}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_query_groups * self.head_dim

    @property
    def expert_matrices(self) -> int:
        return 3 if self.swiglu else 2

    # -- parameters (elements), unsharded ----------------------------------------------------
    def attention_params(self) -> int:
        """Per layer: QKV ``h·(q + 2·kv)`` + output projection ``q·h``."""
        h = self.hidden_size
        return h * (self.q_width + 2 * self.kv_width) + self.q_width * h

    def expert_params(self) -> int:
        """One expert: ``matrices · h · ffn``."""
        return self.expert_matrices * self.hidden_size * self.ffn_hidden_size

    def padded_vocab(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def total_params(self) -> int:
        """All parameters (tp = 1 padding)."""
        h, layers = self.hidden_size, self.num_layers
        per_layer = (self.attention_params() + 2 * h + h * self.num_experts
                     + self.num_experts * self.expert_params())
        embeddings = self.padded_vocab(1) * h * (2 if self.untie_embeddings else 1)
        return layers * per_layer + embeddings + h

    def flags(self) -> list[str]:
        """The model's ``pretrain_moe.py`` flags (Mixtral-style fixed choices included)."""
        out = ["--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
               "--ffn-hidden-size", str(self.ffn_hidden_size),
               "--num-attention-heads", str(self.num_attention_heads)]
        if self.num_query_groups != self.num_attention_heads:
            out += ["--group-query-attention", "--num-query-groups", str(self.num_query_groups)]
        if self.kv_channels and self.kv_channels != self.hidden_size // self.num_attention_heads:
            out += ["--kv-channels", str(self.kv_channels)]
        out += ["--num-experts", str(self.num_experts), "--moe-router-topk", str(self.topk)]
        if self.swiglu:
            out.append("--swiglu")
        if self.untie_embeddings:
            out.append("--untie-embeddings-and-output-weights")
        out += ["--normalization", "RMSNorm", "--disable-bias-linear"]
        return out


@dataclass(frozen=True)
class Workload:
    """Tokens per step."""

    seq_length: int
    """Tokens per sequence, s."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int | None = None
    """Sequences per step; None: micro_batch_size × world (every DP degree divides it)."""

    def __post_init__(self):
        if self.seq_length < 1 or self.micro_batch_size < 1:
            raise ValueError(f"seq_length and micro_batch_size must be >= 1, got "
                             f"{self.seq_length}, {self.micro_batch_size}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")

    def global_batch(self, world_size: int) -> int:
        return self.global_batch_size or self.micro_batch_size * world_size

    def flags(self, world_size: int) -> list[str]:
        return ["--seq-length", str(self.seq_length),
                "--micro-batch-size", str(self.micro_batch_size),
                "--global-batch-size", str(self.global_batch(world_size))]


def list_model_presets() -> list[str]:
    return sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.json"))


def model_from_hf_config(config: Mapping[str, Any], name: str = "model") -> ModelSpec:
    """Mixtral-style ``config.json`` fields → :class:`ModelSpec` (missing fields named)."""
    missing = [key for key in _HF_REQUIRED if key not in config]
    if missing:
        raise ValueError(f"config {name!r} lacks {missing} (need a Mixtral-style config.json)")
    heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    return ModelSpec(
        num_layers=int(config["num_hidden_layers"]), hidden_size=int(config["hidden_size"]),
        ffn_hidden_size=int(config["intermediate_size"]), num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        num_experts=int(config["num_local_experts"]), topk=int(config["num_experts_per_tok"]),
        vocab_size=int(config["vocab_size"]), kv_channels=int(head_dim) if head_dim else None,
        swiglu=config.get("hidden_act", "silu") == "silu",
        untie_embeddings=not config.get("tie_word_embeddings", False), name=name)


def load_model(spec: str | Path) -> ModelSpec:
    """From a ``config.json`` path, an HF model directory, or a preset name."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        preset = MODEL_PRESET_DIR / f"{spec}.json"
        if not preset.is_file():
            raise ValueError(f"model {str(spec)!r} is neither a config.json, an HF model directory "
                             f"nor a preset; presets: {', '.join(list_model_presets())}")
        path = preset
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    name = path.stem if path.name != "config.json" else path.parent.name
    return model_from_hf_config(config, name=name)


def model_from_args(args: argparse.Namespace, vocab_size: int | None = None) -> ModelSpec:
    """``pretrain_moe.py`` flags (after :func:`monta.training.arguments.parse_args`) → spec.

    ``vocab_size``: the tokenizer's, when ``--vocab-size`` is not given (default 32000)."""
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    return ModelSpec(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=heads,
        num_query_groups=groups or heads, num_experts=args.num_experts,
        topk=args.moe_router_topk,
        vocab_size=getattr(args, "vocab_size", None) or vocab_size or 32000,
        kv_channels=args.kv_channels, swiglu=args.swiglu,
        untie_embeddings=args.untie_embeddings_and_output_weights, name="flags",
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)


def workload_from_args(args: argparse.Namespace) -> Workload:
    return Workload(args.seq_length, args.micro_batch_size, args.global_batch_size)
