"""HF Mixtral ``config.json`` ↔ MoNTA's model flags (``pretrain_moe.py`` names).

The mapping, HF field → flag:

    num_hidden_layers → --num-layers              hidden_size → --hidden-size
    intermediate_size → --ffn-hidden-size         num_attention_heads → --num-attention-heads
    num_key_value_heads → --num-query-groups      head_dim (if ≠ hidden/heads) → --kv-channels
    num_local_experts → --num-experts             num_experts_per_tok → --moe-router-topk
    rope_parameters.rope_theta (or rope_theta) → --rotary-base
    rms_norm_eps → --norm-epsilon
    max_position_embeddings → --max-position-embeddings
    vocab_size → the checkpoint's vocabulary (saved as ``args.vocab_size``; padded per TP)

and the fixed Mixtral choices: ``--group-query-attention --swiglu --normalization RMSNorm
--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear``.
The other way (:func:`hf_config_from_args`) starts from the original ``config.json`` when the
checkpoint carries it, so fields MoNTA does not own survive a round trip unchanged.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from monta.convert.errors import ConversionError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
HF_MODEL_TYPE = "mixtral"

# Flags every Mixtral has, as pretrain_moe.py spells them.
FIXED_FLAGS = ["--group-query-attention", "--swiglu", "--normalization", "RMSNorm",
               "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
               "--disable-bias-linear"]

# What a MoNTA checkpoint's args must say to be a Mixtral (arg name → required value).
MIXTRAL_FIXED_ARGS = {
    "swiglu": True,
    "normalization": "RMSNorm",
    "position_embedding_type": "rope",
    "untie_embeddings_and_output_weights": True,
    "disable_bias_linear": True,
}


def read_hf_config(hf_dir: str) -> dict:
    """``hf_dir/config.json`` as a dict (refuses a missing or unreadable file)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found: --hf must be a Hugging Face model directory "
                              f"(config.json + *.safetensors)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return config


def rope_theta(config: Mapping[str, Any]) -> float:
    """The RoPE base: ``rope_parameters.rope_theta`` (transformers 5) or ``rope_theta`` (4.x)."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 1e6))
    return float(theta)


def head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def check_mixtral_config(config: Mapping[str, Any], where: str = "config.json") -> None:
    """Refuse configs MoNTA's model does not reproduce exactly, naming the field."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if not (set(architectures) & set(SUPPORTED_ARCHITECTURES)
            or (not architectures and model_type == HF_MODEL_TYPE)):
        raise ConversionError(
            f"unknown architecture in {where}: architectures={architectures}, "
            f"model_type={model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            f"(model_type {HF_MODEL_TYPE!r})")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "num_local_experts", "num_experts_per_tok", "vocab_size")
    missing = [key for key in required if key not in config]
    if missing:
        raise ConversionError(f"{where} lacks {', '.join(missing)}")
    unsupported = []
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={config['hidden_act']!r} (MoNTA's SwiGLU uses silu)")
    if config.get("tie_word_embeddings", False):
        unsupported.append("tie_word_embeddings=true (Mixtral unties them; MoNTA converts "
                           "untied models only)")
    rope_params = config.get("rope_parameters") or {}
    rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
    if rope_type != "default" or config.get("rope_scaling"):
        unsupported.append(f"RoPE scaling (rope_type={rope_type!r}, "
                           f"rope_scaling={config.get('rope_scaling')!r})")
    theta = rope_theta(config)
    if theta != int(theta):
        unsupported.append(f"rope_theta={theta} (--rotary-base takes an integer)")
    window = config.get("sliding_window")
    max_pos = config.get("max_position_embeddings", 4096 * 32)
    if window is not None and window < max_pos:
        unsupported.append(f"sliding_window={window} < max_position_embeddings={max_pos} "
                           f"(MoNTA attends over the full sequence)")
    if unsupported:
        raise ConversionError(f"{where}: unsupported Mixtral variant: " + "; ".join(unsupported))


def model_flags_from_hf(config: Mapping[str, Any]) -> list[str]:
    """``pretrain_moe.py`` model flags that build this HF Mixtral (checked first)."""
    check_mixtral_config(config)
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    groups = int(config.get("num_key_value_heads") or heads)
    max_pos = int(config.get("max_position_embeddings", 4096))
    flags = [
        "--num-layers", str(config["num_hidden_layers"]),
        "--hidden-size", str(hidden),
        "--ffn-hidden-size", str(config["intermediate_size"]),
        "--num-attention-heads", str(heads),
        "--num-query-groups", str(groups),
        "--max-position-embeddings", str(max_pos),
        "--rotary-base", str(int(rope_theta(config))),
        "--norm-epsilon", repr(float(config.get("rms_norm_eps", 1e-5))),
        "--num-experts", str(config["num_local_experts"]),
        "--moe-router-topk", str(config["num_experts_per_tok"]),
        *FIXED_FLAGS,
    ]
    if head_dim(config) != hidden // heads:
        flags += ["--kv-channels", str(head_dim(config))]
    return flags


def check_mixtral_args(args: Mapping[str, Any], where: str) -> None:
    """Refuse a MoNTA checkpoint whose model is not a Mixtral (HF could not load it)."""
    wrong = [f"--{name.replace('_', '-')}={args.get(name)!r} (Mixtral: {value!r})"
             for name, value in MIXTRAL_FIXED_ARGS.items() if args.get(name) != value]
    if not args.get("num_experts"):
        wrong.append("--num-experts unset (Mixtral is a MoE)")
    if wrong:
        raise ConversionError(f"{where} is not a Mixtral-architecture model: " + "; ".join(wrong))


def _effective_groups(args: Mapping[str, Any]) -> int:
    if args.get("group_query_attention") and args.get("num_query_groups"):
        return int(args["num_query_groups"])
    return int(args["num_attention_heads"])


def hf_config_from_args(args: Mapping[str, Any], vocab_size: int, dtype: str,
                        base: Mapping[str, Any] | None = None,
                        token_ids: Mapping[str, int] | None = None) -> dict:
    """The ``config.json`` of a MoNTA checkpoint (its saved args) as a Mixtral.

    Args:
        args: the checkpoint's saved args (``vars(Namespace)``).
        vocab_size: the real vocabulary (padding rows are stripped).
        dtype: the dtype the safetensors are written in (``"float32"``, ``"bfloat16"``...).
        base: a config to start from (the original HF config of a converted checkpoint, or
            ``--base-config``): every field MoNTA does not own (token ids, ...) is kept as is.
        token_ids: ``bos_token_id`` / ``eos_token_id`` to use when ``base`` has none.
    """
    check_mixtral_args(args, "checkpoint")
    hidden, heads = int(args["hidden_size"]), int(args["num_attention_heads"])
    config: dict = dict(base) if base else {
        "architectures": list(SUPPORTED_ARCHITECTURES),
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": None,
        "hidden_act": "silu",
        "model_type": HF_MODEL_TYPE,
        "output_router_logits": False,
        "pad_token_id": None,
        "router_aux_loss_coef": float(args.get("moe_aux_loss_coeff", 0.001)),
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    if not base:
        config["initializer_range"] = float(args.get("init_method_std", 0.02))
        config.update(token_ids or {})
    kv_channels = args.get("kv_channels")
    config.update({
        "hidden_size": hidden,
        "intermediate_size": int(args["ffn_hidden_size"]),
        "max_position_embeddings": int(args.get("max_position_embeddings")
                                       or args.get("seq_length") or 4096),
        "num_attention_heads": heads,
        "num_hidden_layers": int(args["num_layers"]),
        "num_key_value_heads": _effective_groups(args),
        "num_local_experts": int(args["num_experts"]),
        "num_experts_per_tok": int(args["moe_router_topk"]),
        "rms_norm_eps": float(args["norm_epsilon"]),
        "vocab_size": int(vocab_size),
        "dtype": dtype,
    })
    if kv_channels and int(kv_channels) != hidden // heads:
        config["head_dim"] = int(kv_channels)
    theta = float(args["rotary_base"])
    if "rope_theta" in config and "rope_parameters" not in config:
        config["rope_theta"] = theta  # a 4.x-style base config
    else:
        config["rope_parameters"] = {**(config.get("rope_parameters") or {}),
                                     "rope_theta": theta, "rope_type": "default"}
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    return dict(sorted(config.items()))
