"""MoNTA checkpoint → HF Mixtral directory, on one process.

Reads the checkpoint one tensor (one layer's attention, one expert) at a time with
:class:`~monta.convert.dcp_reader.CheckpointReader` — whatever layout wrote it — splits it into
HF tensors and hands them to a writer that keeps one output shard in memory.
"""

from __future__ import annotations

import json
import logging
import os

from monta.convert import hf_config, mixtral
from monta.convert.checkpoint_info import open_checkpoint, require_vocab_size
from monta.convert.errors import ConversionError
from monta.progress import progress_bar
from monta.convert.safetensors_io import (
    ShardedSafetensorsWriter,
    dtype_from_name,
    dtype_name,
)

logger = logging.getLogger(__name__)


def _token_ids(args: dict) -> dict:
    """bos/eos ids of the checkpoint's tokenizer, when its file is still there."""
    path = args.get("tokenizer_model")
    if not path or not os.path.isfile(path):
        return {}
    from monta.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(path)
    ids = {"eos_token_id": tokenizer.eod}
    if tokenizer.bos >= 0:
        ids["bos_token_id"] = tokenizer.bos
    return ids


def check_output_dir(save: str) -> None:
    if os.path.isdir(save) and any(name.endswith((".safetensors", ".json"))
                                   for name in os.listdir(save)):
        raise ConversionError(f"--save {save} already holds a model (config.json / "
                              f"*.safetensors); choose a new directory")


def export_to_hf(load: str, save: str, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9,
                 base_config: str | None = None, vocab_size: int | None = None,
                 progress: bool = True) -> list[str]:
    """Write ``config.json`` + safetensors for the checkpoint at ``load``; returns file names.

    Args:
        load: a save root or one ``iter_N`` directory.
        save: the HF directory to create.
        dtype: on-disk dtype; default: the original HF config's (converted checkpoints), else
            the checkpoint's own.
        base_config: a ``config.json`` whose other fields (token ids, ...) are kept.
        vocab_size: the real vocabulary when the checkpoint cannot tell (its tokenizer is gone).
    """
    check_output_dir(save)
    info = open_checkpoint(load)
    args = info.args
    hf_config.check_mixtral_args(args, info.path)
    vocab = require_vocab_size(args, vocab_size, info.path)
    dims = mixtral.MixtralDims.from_args(args, vocab)
    reader, rows = info.reader, info.padded_vocab
    if rows < vocab:
        raise ConversionError(f"{info.path}: the embedding has {rows} rows, fewer than the "
                              f"vocabulary {vocab}")
    for key, (lead, shape) in dims.monta_shapes(rows).items():
        found = reader.global_shape(key)
        if found != (*lead, *shape):
            raise ConversionError(f"shape mismatch in {info.path}: {key} is {found}, its saved "
                                  f"args imply {(*lead, *shape)}")
    base = None
    if base_config is not None:
        with open(base_config) as f:
            base = json.load(f)
    elif isinstance(args.get("hf_config"), dict):
        base = args["hf_config"]
    if dtype is None:
        dtype = (base or {}).get("dtype") or (base or {}).get("torch_dtype") \
            or dtype_name(reader.dtype(mixtral.EMBEDDING))
    torch_dtype = dtype_from_name(dtype)
    config = hf_config.hf_config_from_args(args, vocab, dtype, base, _token_ids(args))

    plan = mixtral.export_plan(dims)
    writer = ShardedSafetensorsWriter(save, [named for item in plan for named in item.hf],
                                      torch_dtype, max_shard_bytes)
    for item in progress_bar(plan, enabled=progress, desc="tensors", unit="tensor"):
        full = reader.read_full(item.key, item.index)
        for (name, _shape), tensor in zip(item.hf, mixtral.to_hf(dims, item, full)):
            writer.add(name, tensor)
    files = writer.close()
    with open(os.path.join(save, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return ["config.json", *files]
