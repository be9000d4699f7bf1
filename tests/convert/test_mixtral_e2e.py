"""HF Mixtral → MoNTA (three layouts) → logits, → HF round trip, reshard, train, export.

Each multi-rank step is one job (CPU, gloo), shared by the tests through module fixtures:
three ``hf-to-monta`` conversions (TP2·EP2, TP1·PP2, TP1·EP4), one ``reshard`` (TP2·EP2 →
TP1·PP2·EP4, 8 ranks), one 3-step training run from a converted checkpoint, and two
``tools/forward.py`` jobs (TP2·EP2 and TP1·PP2 layouts, several checkpoints each).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.convert.conftest import TINY_MIXTRAL
from tests.convert.runner import convert, torchrun
from tests.conftest import run_torchrun

LOGITS_TOLERANCE = 1e-4  # fp32, max abs over [2, 16, 300] logits of std ≈ 1.3

LAYOUTS = {
    "tp2ep2": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "tp1ep4": ["--expert-model-parallel-size", "4"],
}
FORWARD_TP2EP2 = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]
FORWARD_PP2 = ["--pipeline-model-parallel-size", "2"]


def _common(path: Path) -> dict:
    from megatron.core import dist_checkpointing

    from monta.training.checkpointing import find_checkpoint

    return dist_checkpointing.load_common_state_dict(find_checkpoint(str(path), required=True))


@pytest.fixture(scope="module")
def converted(tiny_hf, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, flags in LAYOUTS.items():
        result = convert("hf-to-monta", "--hf", str(tiny_hf.dir), "--save", str(root / name),
                         *flags)
        assert result.returncode == 0, result.output[-4000:]
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def resharded(converted, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("resharded") / "tp1pp2ep4"
    result = convert("reshard", "--load", str(converted["tp2ep2"]), "--save", str(save),
                     "--expert-model-parallel-size", "4", "--pipeline-model-parallel-size", "2",
                     timeout_s=480)
    assert result.returncode == 0, result.output[-4000:]
    assert "8 local rank(s) for TP1·PP2·EP4·ETP1" in result.output
    return save


@pytest.fixture(scope="module")
def trained(converted, tmp_path_factory):
    """3 Adam steps (TP2 + SP, EP2) from the TP2·EP2 conversion, on random tokens."""
    run = tmp_path_factory.mktemp("trained")
    flags = (converted["tp2ep2"] / "model_flags.txt").read_text().split()
    result = run_torchrun(
        [*flags, "--load", str(converted["tp2ep2"]), "--save", str(run / "ckpt"),
         "--tensor-model-parallel-size", "2", "--sequence-parallel",
         "--expert-model-parallel-size", "2", "--mock-data", "--vocab-size",
         str(TINY_MIXTRAL["vocab_size"]), "--seq-length", "32", "--micro-batch-size", "2",
         "--train-iters", "3", "--lr", "1e-3", "--lr-warmup-iters", "0", "--log-interval", "1",
         "--eval-iters", "0", "--no-progress-bar"],
        nproc=4, timeout_s=300)
    assert result.returncode == 0, result.output[-4000:]
    return run / "ckpt", result.output


@pytest.fixture(scope="module")
def logits(tiny_hf, converted, resharded, trained, tmp_path_factory) -> dict[str, np.ndarray]:
    """``tools/forward.py`` logits, keyed ``checkpoint@layout``."""
    out_dir = tmp_path_factory.mktemp("logits")
    jobs = {
        "tp2ep2": (4, FORWARD_TP2EP2, {"tp2ep2": converted["tp2ep2"], "resharded": resharded,
                                       "trained": trained[0]}),
        "pp2": (2, FORWARD_PP2, {"pp2": converted["pp2"], "tp1ep4": converted["tp1ep4"],
                                 "resharded": resharded}),
    }
    found = {}
    for layout, (nproc, flags, checkpoints) in jobs.items():
        outputs = [str(out_dir / f"{name}@{layout}.npy") for name in checkpoints]
        result = torchrun("tools/forward.py", nproc, "--input-ids", str(tiny_hf.input_ids),
                          "--load", *map(str, checkpoints.values()), "--output", *outputs,
                          *flags)
        assert result.returncode == 0, result.output[-4000:]
        for name, output in zip(checkpoints, outputs):
            found[f"{name}@{layout}"] = np.load(output)
    return found


def test_hf_to_monta_writes_iteration_0_weights_only(converted):
    for name, flags in LAYOUTS.items():
        root = converted[name]
        assert (root / "latest_checkpointed_iteration.txt").read_text() == "0"
        common = _common(root)
        assert "optimizer" not in common and common["has_rng_state"] is False
        assert common["train_state"]["iteration"] == 0
        args = common["args"]
        given = {flag[2:].replace("-", "_"): int(value)
                 for flag, value in zip(flags[::2], flags[1::2])}
        for size in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size"):
            assert args[size] == given.get(size, 1), size
        # the model flags travel with the checkpoint (and in model_flags.txt for the user)
        assert (args["hidden_size"], args["num_query_groups"], args["ffn_hidden_size"],
                args["num_experts"], args["moe_router_topk"], args["vocab_size"]) == (64, 2, 128, 8,
                                                                                     2, 300)
        assert args["swiglu"] and args["untie_embeddings_and_output_weights"]
        assert args["hf_config"]["model_type"] == "mixtral"
        assert "--num-query-groups 2" in (root / "model_flags.txt").read_text()


@pytest.mark.parametrize("checkpoint", ["tp2ep2@tp2ep2", "pp2@pp2", "tp1ep4@pp2"])
def test_converted_logits_match_transformers(tiny_hf, logits, checkpoint):
    reference = np.load(tiny_hf.logits)
    ours = logits[checkpoint]
    assert ours.shape == reference.shape == (2, 16, TINY_MIXTRAL["vocab_size"])
    diff = float(np.abs(ours - reference).max())
    print(f"{checkpoint}: max |logits - HF| = {diff:.3e}")
    assert diff <= LOGITS_TOLERANCE
    assert reference.std() > 0.5  # the comparison is not between near-zero numbers


def test_reshard_gives_identical_logits(resharded, logits):
    common = _common(resharded)
    args = common["args"]
    assert (args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"],
            args["expert_model_parallel_size"], args["expert_tensor_parallel_size"]) == (1, 2, 4, 1)
    # vocabulary padding follows the layout: 512 rows at TP2, 384 at TP1
    assert np.array_equal(logits["resharded@tp2ep2"], logits["tp2ep2@tp2ep2"])
    assert np.array_equal(logits["resharded@pp2"], logits["pp2@pp2"])


def test_round_trip_is_bit_identical(tiny_hf, converted, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "hf"
    result = convert("monta-to-hf", "--load", str(converted["tp2ep2"]), "--save", str(out),
                     "--max-shard-size", "300KB", timeout_s=120)
    assert result.returncode == 0, result.output[-4000:]
    assert (out / "model.safetensors.index.json").is_file()

    def tensors(directory: Path) -> dict[str, torch.Tensor]:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        found = {}
        for name, file in index["weight_map"].items():
            with safe_open(str(directory / file), "pt") as f:
                found[name] = f.get_tensor(name)
        return found

    original, back = tensors(tiny_hf.dir), tensors(out)
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert json.loads((out / "config.json").read_text()) == \
        json.loads((tiny_hf.dir / "config.json").read_text())


def test_training_resumes_from_converted_checkpoint(trained):
    save, output = trained
    assert "resumed from" in output and "at iteration 0" in output
    assert "holds weights only (no optimizer state): starting a fresh optimizer" in output
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    losses = [float(line.split("lm loss:")[1].split("|")[0]) for line in output.splitlines()
              if "lm loss:" in line]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


def test_trained_checkpoint_exports_to_hf(tiny_hf, trained, logits, tmp_path):
    """MoNTA's logits of the trained checkpoint equal transformers' logits of its export."""
    from transformers import MixtralForCausalLM

    from monta.convert.to_hf import export_to_hf

    export_to_hf(str(trained[0]), str(tmp_path / "hf"), progress=False)
    model = MixtralForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.from_numpy(np.load(tiny_hf.input_ids))).logits.numpy()
    diff = float(np.abs(logits["trained@tp2ep2"] - reference).max())
    print(f"trained@tp2ep2: max |logits - HF(export)| = {diff:.3e}")
    assert diff <= LOGITS_TOLERANCE
    # training moved the weights, so this compares a model the converter had not seen
    assert np.abs(reference - np.load(tiny_hf.logits)).max() > 1e-2


def test_pretrain_refuses_a_checkpoint_of_another_model(converted):
    """Before any collective: model flags and vocabulary padding must match the checkpoint."""
    from monta.training.arguments import parse_args
    from monta.training.checkpointing import CheckpointError
    from monta.training.pretrain import preflight

    flags = (converted["tp2ep2"] / "model_flags.txt").read_text().split()
    base = ["--mock-data", "--vocab-size", "300", "--seq-length", "32",
            "--load", str(converted["tp2ep2"])]
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    assert preflight(parse_args([*flags, *base, *tp2]), world_size=2)[-1] is not None
    wrong = [*flags, *base, *tp2, "--moe-router-topk", "4"]
    with pytest.raises(CheckpointError, match=r"--moe-router-topk 4 here, 2 in the checkpoint"):
        preflight(parse_args(wrong), world_size=2)
    # saved at TP2 (512 rows); TP1 would pad 300 to 384
    with pytest.raises(CheckpointError, match=r"512 rows.*--make-vocab-size-divisible-by 512"):
        preflight(parse_args([*flags, *base]), world_size=1)
    preflight(parse_args([*flags, *base, "--make-vocab-size-divisible-by", "512"]), world_size=1)
