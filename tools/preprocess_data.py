"""Tokenize a text corpus into megatron-core IndexedDataset files (Megatron-LM's flag names).

Input formats (``.gz`` accepted for both):
  * ``.jsonl``: one JSON object per line; each ``--json-keys`` field is one document.
  * ``.txt`` (any other extension): documents are blocks of lines separated by blank lines.

Output per key: ``{output_prefix}_{key}_document.bin/.idx``, one document per input document
(empty/whitespace-only documents are skipped), token dtype uint16 when vocab < 65500 else int32.
Train with ``--data-path {output_prefix}_text_document``.

Example (the bundled corpus, ~2.2 MB of text, a few seconds):
    python tools/preprocess_data.py --input monta/data/bundled/corpus.jsonl.gz \\
        --output-prefix data/bundled --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model monta/data/bundled/tokenizer.model --append-eod --workers 2
"""

import argparse
import logging
import multiprocessing
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from monta.data.corpus import iter_records, open_text  # noqa: E402
from monta.data.tokenizer import BUNDLED_TOKENIZER_MODEL, SentencePieceTokenizer  # noqa: E402

logger = logging.getLogger("preprocess_data")

SUPPORTED_TOKENIZERS = ("SentencePieceTokenizer",)


class Encoder:
    """Tokenizes one record (a tuple of texts, one per json key); one tokenizer per process."""

    tokenizer: Optional[SentencePieceTokenizer] = None  # set per worker by ``initializer``

    def __init__(self, tokenizer_model: str, append_eod: bool) -> None:
        self.tokenizer_model = tokenizer_model
        self.append_eod = append_eod

    def initializer(self) -> None:
        Encoder.tokenizer = SentencePieceTokenizer(self.tokenizer_model)

    def encode(self, record: Tuple[str, ...]) -> Tuple[List[List[int]], int]:
        """Returns ``([ids per key], bytes of text)``; an empty list for an empty document."""
        out = []
        for text in record:
            ids = Encoder.tokenizer.tokenize(text) if text.strip() else []
            if ids and self.append_eod:
                ids.append(Encoder.tokenizer.eod)
            out.append(ids)
        return out, sum(len(t.encode("utf-8")) for t in record)


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help=".jsonl or .txt file, optionally .gz")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="fields of each .jsonl object to tokenize (default: text)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                       help=f"only {SUPPORTED_TOKENIZERS[0]} is supported")
    group.add_argument("--tokenizer-model", default=BUNDLED_TOKENIZER_MODEL,
                       help="sentencepiece .model (default: the bundled one)")
    group.add_argument("--append-eod", action="store_true",
                       help="append the EOD (EOS) id to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between logs")
    group.add_argument("--no-progress-bar", action="store_true",
                       help="no tqdm bar (it is also off when stderr is not a terminal)")
    args = parser.parse_args(argv)

    if args.tokenizer_type not in SUPPORTED_TOKENIZERS:
        parser.error(
            f"--tokenizer-type {args.tokenizer_type} is not supported; MoNTA supports only "
            f"{', '.join(SUPPORTED_TOKENIZERS)} (with --tokenizer-model PATH.model)"
        )
    if args.workers < 1 or args.log_interval < 1:
        parser.error(
            f"--workers ({args.workers}) and --log-interval ({args.log_interval}) must be >= 1"
        )
    return args


def preprocess(args: argparse.Namespace) -> Dict[str, str]:
    """Tokenize ``args.input`` and write one IndexedDataset per json key.

    Returns:
        ``{key: output path prefix}``.

    Raises:
        FileNotFoundError: missing input or tokenizer model.
        ValueError: unreadable tokenizer, bad json keys, or no non-empty document.
    """
    import numpy
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from monta.data.indexed import check_data_prefix
    from monta.progress import progress_bar

    open_text(args.input).close()  # FileNotFoundError with a hint, before anything else
    tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    keys = list(args.json_keys)
    records = iter_records(args.input, keys)
    first = next(records, None)  # surfaces json-key errors before any output file is created
    if first is None:
        raise ValueError(f"input {args.input!r} is empty: it holds no documents")

    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in keys}
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    builders = {key: IndexedDatasetBuilder(prefixes[key] + ".bin", dtype=dtype) for key in keys}
    logger.info("input %s, keys %s, %r, dtype %s, workers %d",
                args.input, keys, tokenizer, dtype.__name__, args.workers)

    def all_records():
        yield first
        yield from records

    encoder = Encoder(args.tokenizer_model, args.append_eod)
    pool = None
    if args.workers > 1:
        pool = multiprocessing.Pool(args.workers, initializer=encoder.initializer)
        encoded = pool.imap(encoder.encode, all_records(), chunksize=32)  # keeps input order
    else:
        encoder.initializer()
        encoded = map(encoder.encode, all_records())

    docs = {key: 0 for key in keys}
    tokens = {key: 0 for key in keys}
    total_bytes, start = 0, time.time()
    try:
        bar = progress_bar(encoded, enabled=not args.no_progress_bar,
                           desc="tokenizing", unit="doc")
        for i, (ids_per_key, nbytes) in enumerate(bar, 1):
            total_bytes += nbytes
            for key, ids in zip(keys, ids_per_key):
                if ids:
                    builders[key].add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                    docs[key] += 1
                    tokens[key] += len(ids)
            if i % args.log_interval == 0:
                elapsed = max(time.time() - start, 1e-9)
                logger.info("processed %d documents (%.1f docs/s, %.2f MB/s)",
                            i, i / elapsed, total_bytes / elapsed / 1e6)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    for key in keys:
        builders[key].finalize(prefixes[key] + ".idx")
    empty = [key for key in keys if docs[key] == 0]
    if empty:
        for key in keys:
            for ext in (".bin", ".idx"):
                os.remove(prefixes[key] + ext)
        raise ValueError(f"input {args.input!r} has no non-empty documents for keys {empty}")
    for key in keys:
        summary = check_data_prefix(prefixes[key])
        logger.info("wrote %s.{bin,idx}: %d documents, %d tokens (%.1fs)",
                    prefixes[key], summary.num_documents, tokens[key], time.time() - start)
    return prefixes


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return preprocess(get_args(argv))


if __name__ == "__main__":
    main()
