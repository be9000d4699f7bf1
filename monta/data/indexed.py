"""Cheap sanity checks of a megatron-core ``IndexedDataset`` (``PREFIX.bin`` + ``PREFIX.idx``).

Pure file reads (a few header bytes and the last pointer/length), no torch, no megatron import,
so a launcher can run it on every rank before anything distributed touches the data.

``.idx`` layout written by megatron-core's ``_IndexWriter`` (all little-endian):
    magic b"MMIDIDX\\x00\\x00" (9) | version u64 = 1 | dtype code u8 |
    sequence_count u64 (S) | document_count u64 (D) |
    sequence_lengths int32[S] | sequence_pointers int64[S] (byte offsets into .bin) |
    document_indices int64[D] (0, ..., S) | [sequence_modes int8[S], multimodal only]
and ``.bin`` is the concatenated tokens, so its size is ``pointers[-1] + lengths[-1] * itemsize``.
"""

import dataclasses
import os
import struct

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
"""megatron.core.datasets.indexed_dataset._INDEX_HEADER (a test checks they agree)."""

DTYPE_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
"""Item size in bytes per megatron-core ``DType`` code (uint8, int8, int16, int32, int64,
float64, float32, uint16)."""

_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_FIX_HINT = (
    "re-create it with: python tools/preprocess_data.py --input CORPUS "
    "--output-prefix PREFIX --tokenizer-type SentencePieceTokenizer --tokenizer-model MODEL "
    "--append-eod (then use PREFIX_text_document as the data path)"
)


@dataclasses.dataclass(frozen=True)
class IndexSummary:
    """What ``check_data_prefix`` learned about one ``PREFIX.{bin,idx}`` pair."""

    prefix: str
    dtype_code: int
    """megatron-core DType code of the token ids (8 = uint16, 4 = int32)."""
    itemsize: int
    num_sequences: int
    num_documents: int
    """Number of documents (``document_count - 1``: the index stores the fence posts)."""
    num_tokens: int


def _read_i64(f, offset: int) -> int:
    f.seek(offset)
    return struct.unpack("<q", f.read(8))[0]


def _read_i32(f, offset: int) -> int:
    f.seek(offset)
    return struct.unpack("<i", f.read(4))[0]


def check_data_prefix(prefix: str) -> IndexSummary:
    """Check that ``prefix.bin``/``prefix.idx`` exist, the index parses and matches the data.

    Args:
        prefix: the path prefix, without ``.bin``/``.idx``.

    Returns:
        An ``IndexSummary`` of the pair.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the prefix ends in .bin/.idx, the .idx is not a megatron-core index or is
            truncated, the dataset is empty, or the .bin size disagrees with the index.
    """
    prefix = os.fspath(prefix)
    if prefix.endswith((".bin", ".idx")):
        raise ValueError(
            f"data path {prefix!r} should be a prefix without the .bin/.idx extension; "
            f"pass {prefix[:-4]!r}"
        )
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            guess = prefix + "_text_document"
            hint = (
                f"did you mean {guess!r} (preprocess_data.py appends _text_document)?"
                if os.path.isfile(guess + ".idx")
                else _FIX_HINT
            )
            raise FileNotFoundError(f"data file not found: {path!r}; {hint}")

    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != INDEX_HEADER:
            raise ValueError(
                f"{idx_path!r} is not a megatron-core index (magic {head[:9]!r}, expected "
                f"{INDEX_HEADER!r}, file size {idx_size} bytes); {_FIX_HINT}"
            )
        version, code, num_seq, num_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            raise ValueError(f"{idx_path!r} has index version {version}, expected 1; {_FIX_HINT}")
        if code not in DTYPE_ITEMSIZE:
            raise ValueError(
                f"{idx_path!r} has unknown dtype code {code} (known: {sorted(DTYPE_ITEMSIZE)}); "
                f"{_FIX_HINT}"
            )
        itemsize = DTYPE_ITEMSIZE[code]
        expected = _HEADER_BYTES + num_seq * (4 + 8) + num_doc * 8
        if idx_size not in (expected, expected + num_seq):  # + int8 modes if multimodal
            raise ValueError(
                f"{idx_path!r} is {idx_size} bytes but its header (sequences={num_seq}, "
                f"documents={num_doc}) implies {expected}; the file is truncated or corrupt; "
                f"{_FIX_HINT}"
            )
        if num_seq == 0 or num_doc < 2:
            raise ValueError(
                f"{idx_path!r} holds no data (sequences={num_seq}, documents={num_doc - 1}); "
                f"preprocess a non-empty corpus; {_FIX_HINT}"
            )
        lengths_at = _HEADER_BYTES
        pointers_at = lengths_at + 4 * num_seq
        docs_at = pointers_at + 8 * num_seq
        last_len = _read_i32(f, lengths_at + 4 * (num_seq - 1))
        first_ptr = _read_i64(f, pointers_at)
        last_ptr = _read_i64(f, pointers_at + 8 * (num_seq - 1))
        first_doc = _read_i64(f, docs_at)
        last_doc = _read_i64(f, docs_at + 8 * (num_doc - 1))
    if first_ptr != 0 or last_len < 0 or last_ptr < 0 or first_doc != 0 or last_doc != num_seq:
        raise ValueError(
            f"{idx_path!r} is inconsistent (first pointer {first_ptr}, last pointer {last_ptr}, "
            f"last length {last_len}, document indices [{first_doc} .. {last_doc}] for "
            f"{num_seq} sequences); {_FIX_HINT}"
        )

    bin_expected = last_ptr + last_len * itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != bin_expected:
        raise ValueError(
            f"{bin_path!r} is {bin_size} bytes but {idx_path!r} says {bin_expected} "
            f"(last pointer {last_ptr} + last length {last_len} x {itemsize} bytes); the pair is "
            f"truncated or from different runs; {_FIX_HINT}"
        )
    return IndexSummary(
        prefix=prefix,
        dtype_code=code,
        itemsize=itemsize,
        num_sequences=num_seq,
        num_documents=num_doc - 1,
        num_tokens=bin_size // itemsize,
    )


_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}


def check_token_ids(summary: IndexSummary, vocab_size: int, sample_tokens: int = 1 << 22) -> None:
    """Check that the data's token ids fit the tokenizer's vocabulary.

    Data preprocessed with another tokenizer almost always uses ids the given one lacks; the
    embedding lookup would then fail (or read garbage) deep inside the first step. Reads at most
    ``sample_tokens`` ids, in 64 evenly spaced slices of the ``.bin`` (all of a small one).

    Raises:
        ValueError: an id is negative or >= ``vocab_size``; names the file, the id and the fix.
    """
    bin_path = summary.prefix + ".bin"
    tokens = np.memmap(bin_path, dtype=_DTYPES[summary.dtype_code], mode="r")
    if tokens.size <= sample_tokens:
        slices = [tokens]
    else:
        width = sample_tokens // 64
        starts = np.linspace(0, tokens.size - width, 64).astype(np.int64)
        slices = [tokens[start:start + width] for start in starts]
    low = min(int(s.min()) for s in slices if s.size)
    high = max(int(s.max()) for s in slices if s.size)
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(
            f"{bin_path!r} holds token id {bad}, outside the tokenizer's vocabulary of "
            f"{vocab_size} (ids 0..{vocab_size - 1}): the data was preprocessed with a different "
            f"tokenizer. Pass the --tokenizer-model it was made with, or re-create it; "
            f"{_FIX_HINT}")
