"""A sentencepiece tokenizer with the interface megatron-core's ``GPTDataset`` needs.

``GPTDatasetConfig`` reads ``vocab_size`` (to pick the token dtype), ``eod`` (end of document),
``pad`` (masked out of the loss) and hashes ``unique_identifiers`` into its index description.
"""

import logging
import os
from collections import OrderedDict
from typing import List, Sequence

logger = logging.getLogger(__name__)

BUNDLED_TOKENIZER_MODEL = os.path.join(os.path.dirname(__file__), "bundled", "tokenizer.model")
"""The BPE model trained on the bundled corpus (vocab 4096); see bundled/README.md."""

_FIX_HINT = (
    "pass --tokenizer-model PATH to a sentencepiece .model file; the bundled one is "
    "monta/data/bundled/tokenizer.model (re-create it with tools/train_tokenizer.py)"
)


class SentencePieceTokenizer:
    """Wraps a sentencepiece ``.model`` file.

    Args:
        model_path: Path to a sentencepiece model (``*.model``).

    Raises:
        FileNotFoundError: ``model_path`` does not exist or is not a file.
        ValueError: the file is not a readable sentencepiece model, or it has no EOS id.
    """

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm

        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path!r}; {_FIX_HINT}")
        self._model_path = os.path.abspath(model_path)
        self._sp = spm.SentencePieceProcessor()
        try:
            # sentencepiece raises OSError / RuntimeError ("ParseFromArray failed") on bad files.
            self._sp.Load(model_file=self._model_path)
        except Exception as err:
            raise ValueError(
                f"cannot read tokenizer model {model_path!r} ({type(err).__name__}: {err}); "
                f"it is not a valid sentencepiece model; {_FIX_HINT}"
            ) from err
        if self._sp.GetPieceSize() <= 0:
            raise ValueError(f"tokenizer model {model_path!r} has an empty vocabulary; {_FIX_HINT}")
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"tokenizer model {model_path!r} has no EOS piece (eos_id={self._sp.eos_id()}); "
                f"train it with eos_id >= 0 (tools/train_tokenizer.py does)"
            )

    @property
    def model_path(self) -> str:
        """Absolute path of the loaded ``.model`` file."""
        return self._model_path

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special and byte-fallback pieces included."""
        return self._sp.GetPieceSize()

    @property
    def eod(self) -> int:
        """End-of-document id (the model's EOS id)."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        """Alias of ``eod``; megatron-core checks it for pad collisions."""
        return self.eod

    @property
    def pad(self) -> int:
        """Pad id, or ``eod`` when the model has no pad piece.

        Note: when ``pad == eod`` megatron-core's ``GPTDataset`` warns and masks nothing as pad.
        """
        pad_id = self._sp.pad_id()
        return pad_id if pad_id >= 0 else self.eod

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id (-1 when the model has none)."""
        return self._sp.bos_id()

    @property
    def unk(self) -> int:
        """Unknown-piece id."""
        return self._sp.unk_id()

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """JSON-serialisable identity hashed by megatron-core into dataset index descriptions."""
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("tokenizer_path", self._model_path),
                ("vocab_size", self.vocab_size),
            ]
        )

    def tokenize(self, text: str) -> List[int]:
        """Encode ``text`` to ids (no BOS/EOS added).

        Args:
            text: any string; unseen characters become byte-fallback pieces.

        Returns:
            ``[n]`` token ids.
        """
        return self._sp.EncodeAsIds(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ``[n]`` token ids back to text."""
        return self._sp.DecodeIds([int(i) for i in ids])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self._model_path!r}, vocab_size={self.vocab_size}, "
            f"eod={self.eod}, pad={self.pad}, bos={self.bos})"
        )


def build_tokenizer(tokenizer_model: str = BUNDLED_TOKENIZER_MODEL) -> SentencePieceTokenizer:
    """Load the tokenizer at ``tokenizer_model`` (defaults to the bundled one) and log it."""
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    logger.info("built %r", tokenizer)
    return tokenizer
