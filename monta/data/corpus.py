"""Reading raw text corpora as a stream of documents.

Formats (``.gz`` of either is read transparently):
  * ``.jsonl`` / ``.json``: one JSON object per line; the document is the value of ``json_key``.
  * anything else (``.txt``): plain UTF-8 text where documents are blocks of lines separated by
    one or more blank (whitespace-only) lines; the lines of a block are kept, joined by ``\\n``.
"""

import gzip
import io
import json
import logging
import os
from typing import IO, Iterator, List, Sequence, Tuple

logger = logging.getLogger(__name__)


def is_jsonl(path: str) -> bool:
    """Whether ``path`` (optionally ``.gz``) is a JSON-lines file, judged by its extension."""
    base = path[: -len(".gz")] if path.endswith(".gz") else path
    return base.endswith((".jsonl", ".json"))


def open_text(path: str) -> IO[str]:
    """Open ``path`` for reading UTF-8 text, gunzipping ``*.gz``.

    Raises:
        FileNotFoundError: ``path`` is not an existing file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"input file not found: {path!r}; pass --input PATH to a .txt or .jsonl file "
            f"(optionally .gz), e.g. monta/data/bundled/corpus.jsonl.gz"
        )
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(path: str, json_key: str = "text") -> Iterator[str]:
    """Yield the documents of ``path`` in file order (empty documents are yielded too).

    Args:
        path: a ``.txt``/``.jsonl`` file, optionally ``.gz``.
        json_key: the field holding the text, for JSON-lines input.

    Raises:
        FileNotFoundError: missing input.
        ValueError: a JSON line that does not parse, is not an object, or lacks ``json_key``.
    """
    for (text,) in iter_records(path, (json_key,)):
        yield text


def iter_records(path: str, json_keys: Sequence[str] = ("text",)) -> Iterator[Tuple[str, ...]]:
    """Yield one tuple of texts (one per key in ``json_keys``) per document of ``path``.

    For ``.txt`` input the only key is the whole block, so ``json_keys`` must be ``("text",)``.

    Raises:
        FileNotFoundError: missing input.
        ValueError: bad keys for .txt input; a JSON line that does not parse, is not an object,
            or lacks a key (the message lists the keys present).
    """
    json_keys = tuple(json_keys)
    if not json_keys:
        raise ValueError("json_keys is empty; pass --json-keys text")
    if not is_jsonl(path) and json_keys != ("text",):
        raise ValueError(
            f"--json-keys {list(json_keys)} only applies to .jsonl input; {path!r} is read as "
            f"plain text (documents separated by blank lines), whose only key is 'text'"
        )
    with open_text(path) as f:
        if is_jsonl(path):
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield _json_record(path, lineno, line, json_keys)
        else:
            block: List[str] = []
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    block.append(line)
                elif block:
                    yield ("\n".join(block),)
                    block = []
            if block:
                yield ("\n".join(block),)


def _json_record(path: str, lineno: int, line: str, json_keys: Tuple[str, ...]) -> Tuple[str, ...]:
    """Parse one JSON line and return its ``json_keys`` texts, with errors naming the line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    texts = []
    for key in json_keys:
        if key not in obj:
            raise ValueError(
                f"{path}:{lineno}: json key {key!r} not found; the keys there are "
                f"{sorted(obj)}; pass --json-keys with one of them"
            )
        if not isinstance(obj[key], str):
            raise ValueError(
                f"{path}:{lineno}: json key {key!r} holds a {type(obj[key]).__name__}, "
                f"expected a string"
            )
        texts.append(obj[key])
    return tuple(texts)
