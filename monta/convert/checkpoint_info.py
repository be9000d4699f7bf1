"""What conversion needs to know about a MoNTA checkpoint, read without collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

from monta.convert import mixtral
from monta.convert.dcp_reader import CheckpointReader
from monta.convert.errors import ConversionError


@dataclass
class CheckpointInfo:
    """One ``iter_N`` directory: its saved args and train state, and a region reader."""

    path: str
    args: dict
    train_state: dict
    reader: CheckpointReader

    @property
    def padded_vocab(self) -> int:
        """Rows of the saved embedding (the vocabulary padded for the layout that saved it)."""
        key = mixtral.EMBEDDING if mixtral.EMBEDDING in self.reader.tensors else mixtral.OUTPUT
        return self.reader.global_shape(key)[0]


def open_checkpoint(load: str) -> CheckpointInfo:
    """``load`` is a save root (with a tracker) or one ``iter_N`` directory."""
    from megatron.core import dist_checkpointing

    from monta.training.checkpointing import CheckpointError, find_checkpoint

    try:
        path = find_checkpoint(load, required=True)
        common = dist_checkpointing.load_common_state_dict(path)
    except CheckpointError as error:
        raise ConversionError(str(error)) from error
    args = common.get("args")
    if not isinstance(args, dict):
        raise ConversionError(f"{path}/common.pt has no saved args: not a MoNTA checkpoint")
    return CheckpointInfo(path, args, dict(common.get("train_state") or {}),
                          CheckpointReader(path))


def real_vocab_size(args: dict, override: int | None = None) -> int | None:
    """The unpadded vocabulary: ``override`` (``--vocab-size``), else the saved args' (converted
    and ``--mock-data`` checkpoints), else the saved tokenizer's if that file is still there."""
    if override is not None:
        return override
    tokenizer = args.get("tokenizer_model")
    if tokenizer:
        if os.path.isfile(tokenizer):
            from monta.data.tokenizer import SentencePieceTokenizer

            return SentencePieceTokenizer(tokenizer).vocab_size
        return None
    return args.get("vocab_size")


def require_vocab_size(args: dict, override: int | None, path: str) -> int:
    vocab = real_vocab_size(args, override)
    if vocab is None:
        raise ConversionError(
            f"cannot tell the real vocabulary of {path}: its tokenizer "
            f"{args.get('tokenizer_model')!r} is gone; pass --vocab-size N")
    return vocab
