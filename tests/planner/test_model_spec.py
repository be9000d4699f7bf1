"""Model specs from HF configs and pretrain_moe.py flags; parameter counts; printed flags."""

from __future__ import annotations

import json

import pytest

from monta.planner.model import Workload, load_model, model_from_args, model_from_hf_config
from monta.training.arguments import parse_args


def test_mixtral_8x7b_has_its_published_parameter_count():
    model = load_model("mixtral-8x7b")
    assert (model.num_layers, model.num_experts, model.topk, model.num_query_groups) == (
        32, 8, 2, 8)
    # Mixtral-8x7B: 46.7 B parameters (Mistral AI); per layer 8 x 3 x 4096 x 14336 experts
    assert model.total_params() / 1e9 == pytest.approx(46.7, abs=0.05)
    assert model.attention_params() == 4096 * (4096 + 2 * 1024) + 4096 * 4096


def test_paper_model_is_llama2_70b_shaped():
    model = load_model("paper-2x70b")
    assert (model.hidden_size, model.ffn_hidden_size, model.num_layers) == (8192, 28672, 80)
    assert (model.num_attention_heads, model.num_query_groups, model.num_experts) == (64, 8, 2)
    assert model.topk == 2  # our stated assumption, as examples/paper_2x70b.sh (docs/planner.md)


def test_hf_config_dir_and_missing_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
         "num_experts_per_tok": 2, "vocab_size": 100}))
    model = load_model(tmp_path)
    assert (model.kv_width, model.padded_vocab(2)) == (32, 256)
    with pytest.raises(ValueError, match=r"lacks \['num_local_experts'"):
        model_from_hf_config({"hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1,
                              "num_attention_heads": 1, "vocab_size": 1})


def test_flags_round_trip_through_pretrain_parser():
    model = load_model("mixtral-8x7b")
    args = parse_args(model.flags() + Workload(4096, 1, 256).flags(64))
    again = model_from_args(args, vocab_size=model.vocab_size)
    assert again.total_params() == model.total_params()
    assert (args.seq_length, args.micro_batch_size, args.global_batch_size) == (4096, 1, 256)
    assert Workload(128, 4).global_batch(8) == 32  # default: micro batch x world
