"""Bad input is refused by the preflight, before any process group exists (so nothing hangs)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from monta.training.arguments import parse_args
from monta.training.checkpointing import CheckpointError
from monta.training.pretrain import preflight
from monta.training.validation import ConfigError

from tests.conftest import TINY_MODEL


def _args(tokenizer_model, data_prefix, *extra):
    return parse_args([*TINY_MODEL, "--data-path", data_prefix, "--tokenizer-model",
                       tokenizer_model, *extra])


def test_valid_configuration_passes(tokenizer_model, tiny_data_prefix):
    args = _args(tokenizer_model, tiny_data_prefix, "--tensor-model-parallel-size", "2",
                 "--sequence-parallel", "--expert-model-parallel-size", "2")
    dims, config, tokenizer, vocab_size, load_path = preflight(args, world_size=4)
    assert (dims.tp, dims.dp, dims.ep) == (2, 2, 2)
    assert config.num_moe_experts == 8 and vocab_size == tokenizer.vocab_size
    assert load_path is None and args.global_batch_size == 2 * 2


def test_top1_with_pre_softmax_passes(tokenizer_model, tiny_data_prefix):
    args = _args(tokenizer_model, tiny_data_prefix, "--moe-router-topk", "1",
                 "--moe-router-pre-softmax")
    _dims, config, *_ = preflight(args, world_size=1)
    assert config.moe_router_topk == 1 and config.moe_router_pre_softmax


def test_query_groups_without_gqa_are_ignored_as_megatron_does(tokenizer_model,
                                                               tiny_data_prefix):
    """megatron reads --num-query-groups only under --group-query-attention; a stray value
    that would not divide the heads or TP must not refuse a model that never uses it."""
    args = parse_args([a for a in TINY_MODEL if a != "--group-query-attention"] +
                      ["--data-path", tiny_data_prefix, "--tokenizer-model", tokenizer_model,
                       "--num-query-groups", "3", "--tensor-model-parallel-size", "2",
                       "--sequence-parallel"])
    _dims, config, *_ = preflight(args, world_size=2)
    assert config.num_query_groups == config.num_attention_heads == 4


TORCH_PROFILER = ["--use-pytorch-profiler", "--tensorboard-dir", "unused_tb"]
# (extra flags, world size, the fragments the error must contain)
BAD_CONFIGS = {
    "world_not_divisible_by_tp_pp": (["--tensor-model-parallel-size", "2",
                                      "--pipeline-model-parallel-size", "2", "--sequence-parallel"],
                                     6, ["world size 6", "= 4"]),
    "experts_not_divisible_by_ep": (["--expert-model-parallel-size", "3"], 3,
                                    ["--num-experts 8", "--expert-model-parallel-size 3"]),
    "heads_not_divisible_by_tp": (["--tensor-model-parallel-size", "3", "--sequence-parallel",
                                   "--seq-length", "66"], 3,
                                  ["--num-attention-heads 4", "--tensor-model-parallel-size 3"]),
    "sp_off_with_tp_and_moe": (["--tensor-model-parallel-size", "2"], 2,
                               ["--sequence-parallel"]),
    "unknown_dispatcher": (["--moe-token-dispatcher-type", "all2all"], 1,
                           ["'all2all'", "alltoall"]),
    "global_batch_mismatch": (["--global-batch-size", "6", "--micro-batch-size", "4"], 1,
                              ["--global-batch-size 6", "--micro-batch-size 4"]),
    "topk_above_experts": (["--moe-router-topk", "9"], 1, ["--moe-router-topk 9"]),
    "top1_without_pre_softmax": (["--moe-router-topk", "1"], 1, ["--moe-router-pre-softmax"]),
    "layers_not_divisible_by_pp": (["--pipeline-model-parallel-size", "4"], 4,
                                   ["--num-layers 2", "--pipeline-model-parallel-size 4"]),
    "query_groups_not_dividing_heads": (["--num-query-groups", "3"], 1,
                                        ["--num-query-groups 3"]),
    "ffn_not_divisible_by_etp": (["--expert-tensor-parallel-size", "3", "--ffn-hidden-size", "100"],
                                 3, ["--ffn-hidden-size 100", "--expert-tensor-parallel-size 3"]),
    "bias_with_expert_tp": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2,
                            ["Bias in Moe"]),
    "save_interval_without_save": (["--save-interval", "5"], 1, ["--save-interval needs --save"]),
    "bf16_without_gpu": (["--bf16"], 1, ["--bf16 needs a GPU"]),
    "distributed_optimizer_without_gpu": (["--use-distributed-optimizer"], 2,
                                          ["--use-distributed-optimizer needs a GPU"]),
    "profile_window_empty": (["--profile", *TORCH_PROFILER, "--profile-step-start", "3",
                              "--profile-step-end", "3"], 1,
                             ["--profile-step-start 3", "--profile-step-end 3"]),
    "profile_window_after_training": (["--profile", *TORCH_PROFILER, "--train-iters", "4",
                                       "--profile-step-start", "4", "--profile-step-end", "6"],
                                      1, ["--profile-step-start 4", "--train-iters 4"]),
    "profile_rank_outside_world": (["--profile", *TORCH_PROFILER, "--profile-ranks", "0", "3"],
                                   2, ["--profile-ranks [3]", "world of 2 ranks"]),
    "torch_profiler_without_tensorboard_dir": (["--profile", "--use-pytorch-profiler"], 1,
                                               ["--tensorboard-dir"]),
    "torch_profiler_without_profile": (["--use-pytorch-profiler"], 1, ["add --profile"]),
    "te_cross_entropy_without_te": (["--cross-entropy-loss-fusion",
                                     "--cross-entropy-fusion-impl", "te"], 1,
                                    ["--cross-entropy-fusion-impl te", "native"]),
    "nsys_profile_without_gpu": (["--profile"], 1, ["needs a GPU", "--use-pytorch-profiler"]),
    "recompute_method_without_granularity": (["--recompute-method", "uniform"], 1,
                                             ["--recompute-method apply to",
                                              "no --recompute-granularity"]),
    "recompute_full_without_method": (["--recompute-granularity", "full"], 1,
                                      ["needs --recompute-method", "--recompute-num-layers"]),
    "recompute_layers_beyond_stage": (["--recompute-granularity", "full", "--recompute-method",
                                       "block", "--recompute-num-layers", "2",
                                       "--pipeline-model-parallel-size", "2"], 2,
                                      ["--recompute-num-layers 2", "the 1 layers"]),
    "recompute_modules_with_full": (["--recompute-granularity", "full", "--recompute-method",
                                     "uniform", "--recompute-num-layers", "1",
                                     "--recompute-modules", "moe"], 1,
                                    ["--recompute-modules applies to", "got full"]),
    "recompute_num_layers_with_selective": (["--recompute-granularity", "selective",
                                             "--recompute-num-layers", "1"], 1,
                                            ["--recompute-num-layers apply to", "got selective"]),
    "recompute_moe_act_without_grouped_gemm": (["--recompute-granularity", "selective",
                                                "--recompute-modules", "moe_act"], 1,
                                               ["moe_act needs --moe-grouped-gemm"]),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_configuration_is_refused(name, tokenizer_model, tiny_data_prefix):
    extra, world, fragments = BAD_CONFIGS[name]
    if name in ("bf16_without_gpu", "nsys_profile_without_gpu",
                "distributed_optimizer_without_gpu") and torch.cuda.is_available():
        pytest.skip("a GPU is present: the flags are valid here")
    if name == "bias_with_expert_tp":  # megatron-core's own check, surfaced as ConfigError
        args = parse_args([a for a in TINY_MODEL if a != "--disable-bias-linear"] +
                          ["--data-path", tiny_data_prefix, "--tokenizer-model", tokenizer_model,
                           *extra])
    else:
        args = _args(tokenizer_model, tiny_data_prefix, *extra)
    with pytest.raises(ConfigError) as error:
        preflight(args, world_size=world)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_missing_data_path(tokenizer_model, tmp_path):
    args = _args(tokenizer_model, str(tmp_path / "nothing_text_document"))
    with pytest.raises(ConfigError, match="nothing_text_document"):
        preflight(args, world_size=1)


def test_no_data_path_at_all(tokenizer_model):
    args = parse_args([*TINY_MODEL, "--tokenizer-model", tokenizer_model])
    with pytest.raises(ConfigError, match="--data-path"):
        preflight(args, world_size=1)


def test_truncated_data_file(tokenizer_model, tiny_data_prefix, tmp_path):
    prefix = tmp_path / "cut_text_document"
    shutil.copy(tiny_data_prefix + ".idx", str(prefix) + ".idx")
    data = open(tiny_data_prefix + ".bin", "rb").read()
    open(str(prefix) + ".bin", "wb").write(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"cut_text_document\.bin"):
        preflight(_args(tokenizer_model, str(prefix)), world_size=1)


def test_garbage_index_file(tokenizer_model, tiny_data_prefix, tmp_path):
    prefix = tmp_path / "junk_text_document"
    shutil.copy(tiny_data_prefix + ".bin", str(prefix) + ".bin")
    open(str(prefix) + ".idx", "wb").write(os.urandom(256))
    with pytest.raises(ConfigError, match=r"junk_text_document\.idx"):
        preflight(_args(tokenizer_model, str(prefix)), world_size=1)


def test_missing_tokenizer(tiny_data_prefix, tmp_path):
    args = _args(str(tmp_path / "missing.model"), tiny_data_prefix)
    with pytest.raises(ConfigError, match="missing.model"):
        preflight(args, world_size=1)


def test_corrupt_tokenizer(tiny_data_prefix, tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConfigError, match="bad.model"):
        preflight(_args(str(bad), tiny_data_prefix), world_size=1)


def test_load_dir_missing(tokenizer_model, tiny_data_prefix, tmp_path):
    args = _args(tokenizer_model, tiny_data_prefix, "--load", str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="does not exist"):
        preflight(args, world_size=1)


def test_load_dir_empty(tokenizer_model, tiny_data_prefix, tmp_path):
    args = _args(tokenizer_model, tiny_data_prefix, "--load", str(tmp_path))
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt"):
        preflight(args, world_size=1)


def test_load_equal_to_save_starts_fresh(tokenizer_model, tiny_data_prefix, tmp_path):
    """The auto-resume idiom (--load = --save) on an empty directory is a fresh start."""
    args = _args(tokenizer_model, tiny_data_prefix, "--load", str(tmp_path), "--save",
                 str(tmp_path))
    assert preflight(args, world_size=1)[-1] is None


def test_stale_tracker(tokenizer_model, tiny_data_prefix, tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("40")
    args = _args(tokenizer_model, tiny_data_prefix, "--load", str(tmp_path))
    with pytest.raises(CheckpointError, match="iter_0000040"):
        preflight(args, world_size=1)


def test_garbage_tracker(tokenizer_model, tiny_data_prefix, tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release?")
    args = _args(tokenizer_model, tiny_data_prefix, "--load", str(tmp_path))
    with pytest.raises(CheckpointError, match="iteration number"):
        preflight(args, world_size=1)


def test_checkpoint_missing_metadata(tokenizer_model, tiny_data_prefix, tmp_path):
    ckpt = tmp_path / "iter_0000010"
    ckpt.mkdir()
    (ckpt / "common.pt").write_bytes(b"x")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10")
    before = sorted(p.name for p in ckpt.iterdir())
    args = _args(tokenizer_model, tiny_data_prefix, "--load", str(tmp_path))
    with pytest.raises(CheckpointError, match="metadata.json"):
        preflight(args, world_size=1)
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing touched


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--num-expert", "8"])  # typo of --num-experts; no prefix matching
    assert "unrecognized arguments" in capsys.readouterr().err
