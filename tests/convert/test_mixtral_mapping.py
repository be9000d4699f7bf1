"""The HF ↔ MoNTA tensor mapping and config mapping, on one process (no megatron model)."""

from __future__ import annotations

import torch

from monta.convert import hf_config, mixtral
from monta.convert.mixtral import MixtralDims

DIMS = MixtralDims(num_layers=2, hidden_size=16, num_heads=8, num_groups=2, head_dim=4,
                   ffn_hidden_size=12, num_experts=4, vocab_size=50)
PADDED = 64


def _random_hf(dims: MixtralDims) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in dims.hf_shapes().items()}


def _getter(tensors):
    return lambda name, region: tensors[name][region].clone()


def _full_region(shape):
    return tuple(slice(0, n) for n in shape)


def test_hf_to_monta_to_hf_is_the_identity():
    hf = _random_hf(DIMS)
    shapes = DIMS.monta_shapes(PADDED)
    seen = set()
    for item in mixtral.export_plan(DIMS):
        _lead, shape = shapes[item.key]
        full = mixtral.read_monta_region(DIMS, item.key, item.index, _full_region(shape),
                                         _getter(hf))
        assert tuple(full.shape) == shape
        for (name, hf_shape), tensor in zip(item.hf, mixtral.to_hf(DIMS, item, full)):
            assert tuple(tensor.shape) == hf_shape and torch.equal(tensor, hf[name]), name
            seen.add(name)
    assert seen == set(hf)


def test_fused_layouts():
    """QKV rows are [q heads of group g; k_g; v_g] per group; fc1 is [w1; w3]; padding is 0."""
    hf = _random_hf(DIMS)
    get = _getter(hf)
    qkv = mixtral.read_monta_region(DIMS, mixtral.QKV, (1,), _full_region((48, 16)), get)
    q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    per_group = DIMS.group_rows  # (8/2 + 2) · 4 = 24 rows
    assert per_group == 24
    grouped = qkv.view(2, per_group, 16)
    for g in range(2):
        assert torch.equal(grouped[g, :16], q[g * 16:(g + 1) * 16])  # 4 query heads × 4
        assert torch.equal(grouped[g, 16:20], k[g * 4:(g + 1) * 4])
        assert torch.equal(grouped[g, 20:24], v[g * 4:(g + 1) * 4])
    fc1 = mixtral.read_monta_region(DIMS, mixtral.FC1, (0, 3), _full_region((24, 16)), get)
    assert torch.equal(fc1[:12], hf["model.layers.0.block_sparse_moe.experts.3.w1.weight"])
    assert torch.equal(fc1[12:], hf["model.layers.0.block_sparse_moe.experts.3.w3.weight"])
    emb = mixtral.read_monta_region(DIMS, mixtral.EMBEDDING, (), _full_region((PADDED, 16)), get)
    assert torch.equal(emb[:50], hf["model.embed_tokens.weight"]) and not emb[50:].any()


def test_any_region_equals_the_slice_of_the_full_tensor():
    """What a TP/ETP rank reads (aligned or not) is the matching slice of the whole tensor."""
    hf = _random_hf(DIMS)
    get = _getter(hf)
    cases = [(mixtral.QKV, (0,), (48, 16)), (mixtral.FC1, (1, 2), (24, 16)),
             (mixtral.EMBEDDING, (), (PADDED, 16)), (mixtral.OUTPUT, (), (PADDED, 16)),
             (mixtral.PROJ, (1,), (16, 32)), (mixtral.FC2, (0, 0), (16, 12))]
    for key, index, shape in cases:
        full = mixtral.read_monta_region(DIMS, key, index, _full_region(shape), get)
        for a, b in [(0, shape[0] // 2), (shape[0] // 2, shape[0]), (5, shape[0] - 7),
                     (shape[0] // 4, shape[0] // 4 + 3)]:
            cols = slice(3, shape[1] - 2)
            part = mixtral.read_monta_region(DIMS, key, index, (slice(a, b), cols), get)
            assert torch.equal(part, full[a:b, cols]), (key, a, b)


def test_hf_config_round_trips_through_flags():
    from monta.training.arguments import parse_args

    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
              "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "intermediate_size": 14336, "num_local_experts": 8,
              "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
              "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
              "eos_token_id": 2, "torch_dtype": "bfloat16"}
    flags = hf_config.model_flags_from_hf(config)
    args = vars(parse_args(flags))
    assert (args["num_layers"], args["hidden_size"], args["ffn_hidden_size"],
            args["num_attention_heads"], args["num_query_groups"], args["rotary_base"],
            args["num_experts"], args["moe_router_topk"], args["norm_epsilon"]) == \
        (32, 4096, 14336, 32, 8, 1000000, 8, 2, 1e-5)
    back = hf_config.hf_config_from_args(args, 32000, "bfloat16", base=config)
    assert back == {**config, "dtype": "bfloat16"}  # a 4.x config keeps its rope_theta field
    fresh = hf_config.hf_config_from_args(args, 32000, "float32")
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size",
                "num_local_experts", "num_experts_per_tok", "vocab_size", "rms_norm_eps"):
        assert fresh[key] == config[key], key
    assert fresh["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}
    assert fresh["architectures"] == ["MixtralForCausalLM"] and fresh["dtype"] == "float32"
