"""Train a sentencepiece BPE tokenizer (byte fallback) on one or more corpus files.

Each non-empty line of each document is one training sentence (sentencepiece learns no merges
across lines; newlines are encoded as the byte piece <0x0A> thanks to byte_fallback).
Inputs as in tools/preprocess_data.py: .txt (blank-line separated documents) or .jsonl
(``--json-keys``), optionally .gz.

The bundled model was made with (from the repo root):
    python tools/train_tokenizer.py --input monta/data/bundled/corpus.jsonl.gz \\
        --model-prefix monta/data/bundled/tokenizer --vocab-size 4096
which writes tokenizer.model and tokenizer.vocab.
"""

import argparse
import logging
import os
import sys
from typing import Iterator, List

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from monta.data.corpus import iter_documents  # noqa: E402

logger = logging.getLogger(__name__)

_MIN_VOCAB = 512  # byte_fallback needs 256 byte pieces + specials + the corpus' characters


def _sentences(inputs: List[str], json_key: str) -> Iterator[str]:
    """Yield every non-empty line of every document of every input, in order."""
    for path in inputs:
        for doc in iter_documents(path, json_key):
            for line in doc.split("\n"):
                if line.strip():
                    yield line


def train(inputs: List[str], model_prefix: str, vocab_size: int, json_key: str = "text") -> str:
    """Train and write ``{model_prefix}.model`` / ``.vocab``; returns the ``.model`` path.

    Special ids: unk 0 ``<unk>``, bos 1 ``<s>``, eos 2 ``</s>`` (our EOD), pad 3 ``<pad>``.
    Text is not normalised (``identity``) and whitespace is kept, so that
    ``detokenize(tokenize(text)) == text``.
    """
    import sentencepiece as spm

    if vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small: with byte_fallback the vocabulary holds "
            f"256 byte pieces + specials + the corpus' characters; use >= {_MIN_VOCAB}"
        )
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input file not found: {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.Train(
        sentence_iterator=_sentences(inputs, json_key),
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9999,  # rare characters fall back to bytes
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # indentation runs
        split_digits=True,
        max_sentence_length=16384,  # bytes; longer lines are skipped by the trainer
        input_sentence_size=0,  # use every sentence: deterministic, no sampling
        shuffle_input_sentence=False,
        num_threads=1,  # deterministic merges
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        minloglevel=2,
    )
    model_path = model_prefix + ".model"
    logger.info("wrote %s (vocab_size=%d)", model_path, vocab_size)
    return model_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files (.gz ok)")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--json-keys", default="text", help="text field of .jsonl inputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train(args.input, args.model_prefix, args.vocab_size, args.json_keys)


if __name__ == "__main__":
    main()
