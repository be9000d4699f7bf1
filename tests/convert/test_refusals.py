"""Conversion refuses bad input with a clear message, before starting any job."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from monta.convert import ConversionError, hf_config
from monta.convert.cli import plan_hf_to_monta
from tests.convert.runner import convert


def _opts(hf, tp=1, pp=1, ep=1, etp=None, save="unused"):
    return argparse.Namespace(hf=str(hf), save=save, tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                              expert_tensor_parallel_size=etp, make_vocab_size_divisible_by=128,
                              no_progress_bar=True)


@pytest.fixture
def hf_copy(tiny_hf, tmp_path):
    target = tmp_path / "hf"
    shutil.copytree(tiny_hf.dir, target)
    return target


def _edit_config(hf, **changes):
    path = hf / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_valid_input_plans_a_job(tiny_hf):
    plan = plan_hf_to_monta(_opts(tiny_hf.dir, tp=2, ep=2), verify=True)
    assert plan.layout.min_world_size == 4 and plan.padded_vocab == 512
    assert plan_hf_to_monta(_opts(tiny_hf.dir, ep=4, pp=2), verify=True).layout.min_world_size == 8


def test_unknown_architecture(hf_copy):
    _edit_config(hf_copy, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ConversionError, match=r"unknown architecture.*LlamaForCausalLM"):
        plan_hf_to_monta(_opts(hf_copy), verify=True)


def test_unsupported_mixtral_variants(hf_copy):
    _edit_config(hf_copy, tie_word_embeddings=True, hidden_act="gelu")
    with pytest.raises(ConversionError, match=r"tie_word_embeddings.*|hidden_act"):
        plan_hf_to_monta(_opts(hf_copy), verify=True)


def test_missing_shard(hf_copy):
    (hf_copy / "model-00003-of-00008.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"missing shard\(s\) model-00003-of-00008"):
        plan_hf_to_monta(_opts(hf_copy), verify=True)


def test_shape_mismatch(hf_copy):
    _edit_config(hf_copy, intermediate_size=96)
    with pytest.raises(ConversionError, match=r"shape mismatch.*w1.weight: \(128, 64\) "
                                              r"\(config.json implies \(96, 64\)\)"):
        plan_hf_to_monta(_opts(hf_copy), verify=True)


def test_missing_tensor(tiny_hf, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    (tmp_path / "hf").mkdir()
    shutil.copy(tiny_hf.dir / "config.json", tmp_path / "hf")
    index = json.loads((tiny_hf.dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for name, file in index["weight_map"].items():
        if name != "model.layers.1.self_attn.k_proj.weight":
            with safe_open(str(tiny_hf.dir / file), "pt") as f:
                tensors[name] = f.get_tensor(name)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))  # one file, no index
    with pytest.raises(ConversionError, match=r"missing, e.g. model.layers.1.self_attn.k_proj"):
        plan_hf_to_monta(_opts(tmp_path / "hf"), verify=True)


@pytest.mark.parametrize("sizes, message", [
    (dict(tp=3), r"--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (dict(ep=3), r"--num-experts 8 is not divisible by --expert-model-parallel-size 3"),
    (dict(pp=4), r"--num-layers 2 is not divisible by --pipeline-model-parallel-size 4"),
    (dict(tp=2, etp=3), r"--ffn-hidden-size 128 is not divisible by "
                        r"--expert-tensor-parallel-size 3"),
])
def test_parallel_sizes_that_do_not_divide_the_model(tiny_hf, sizes, message):
    with pytest.raises(ConversionError, match=message):
        plan_hf_to_monta(_opts(tiny_hf.dir, **sizes), verify=True)


def test_monta_to_hf_refuses_other_architectures():
    args = {"swiglu": False, "normalization": "LayerNorm", "position_embedding_type": "rope",
            "untie_embeddings_and_output_weights": True, "disable_bias_linear": False,
            "num_experts": 8}
    with pytest.raises(ConversionError, match=r"--swiglu=False.*--normalization='LayerNorm'"):
        hf_config.check_mixtral_args(args, "ckpt")


def test_command_line_reports_errors_without_starting_a_job(hf_copy, tmp_path):
    _edit_config(hf_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    result = convert("hf-to-monta", "--hf", str(hf_copy), "--save", str(tmp_path / "out"),
                     timeout_s=120)
    assert result.returncode == 2, result.output[-3000:]
    assert "error: unknown architecture" in result.output
    assert "local rank" not in result.output and not (tmp_path / "out").exists()
