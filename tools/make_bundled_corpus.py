"""Re-create MoNTA's bundled English corpus from the running Python's standard library.

The corpus is prose written for the Python documentation (PSF License, see bundled/LICENSE):
  1. ``pydoc_data.topics.topics``: the Language Reference sections ``help()`` shows (~465 KB);
  2. docstrings of every stdlib ``.py`` file (module, class, function), read with ``ast`` — no
     module is imported — and grouped into one document per module (~1.8 MB). Doctest blocks
     (a ``>>>`` line up to the next blank line) are dropped: we want prose, not code.

Output: ``monta/data/bundled/corpus.jsonl.gz`` (one JSON object per document:
``{"text": ..., "source": ...}``), written with gzip mtime 0 so the bytes depend only on the
stdlib sources, plus ``monta/data/bundled/LICENSE`` (the stdlib's own LICENSE.txt).

Usage (from the repo root; the bundled copy was made with CPython 3.11.7):
    python tools/make_bundled_corpus.py [--output-dir monta/data/bundled]
"""

import argparse
import ast
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
from typing import Iterator, List, Tuple

logger = logging.getLogger(__name__)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "lib-dynload", "__phello__"}  # test suites, third-party code, binaries
_MIN_DOC_CHARS = 200  # modules with less docstring prose than this are dropped


def _drop_doctests(text: str) -> str:
    """Remove doctest blocks: from a line starting with ``>>>`` to the next blank line."""
    out, in_doctest = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_doctest = True
        elif not stripped:
            in_doctest = False
        if not in_doctest:
            out.append(line.rstrip())
    return "\n".join(out).strip()


def _topics_documents() -> Iterator[Tuple[str, str]]:
    """Yield ``(source, text)`` per pydoc topic, sorted by topic name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = "\n".join(line.rstrip() for line in topics[name].splitlines()).strip()
        if text:
            yield f"pydoc_data.topics:{name}", text


def _module_docstrings(path: str) -> List[str]:
    """Docstrings of a module and its classes/functions, in source order, doctests dropped."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    docs = []
    for node in ast.walk(tree):  # breadth-first, deterministic
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                doc = _drop_doctests(doc)
                if len(doc.split()) >= 3:  # skip "Return self." style one-liners
                    docs.append(doc)
    return docs


def _docstring_documents(stdlib: str) -> Iterator[Tuple[str, str]]:
    """Yield ``(source, text)`` per stdlib module, one document of all its docstrings."""
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")
        )
        for filename in sorted(filenames):
            if not filename.endswith(".py") or filename in ("topics.py", "this.py"):
                continue  # topics.py is source 1; this.py is rot13 text
            path = os.path.join(dirpath, filename)
            module = os.path.relpath(path, stdlib)[: -len(".py")].replace(os.sep, ".")
            try:
                docs = _module_docstrings(path)
            except (SyntaxError, UnicodeDecodeError) as err:
                logger.warning("skipping %s: %s", path, err)
                continue
            text = "\n\n".join(docs)
            if len(text) >= _MIN_DOC_CHARS:
                yield f"stdlib-docstrings:{module}", text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output-dir", default=os.path.join(_REPO_ROOT, "monta", "data", "bundled")
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    stdlib = sysconfig.get_paths()["stdlib"]
    os.makedirs(args.output_dir, exist_ok=True)
    out_path = os.path.join(args.output_dir, "corpus.jsonl.gz")
    n_docs = n_chars = n_bytes = 0
    with open(out_path, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9
    ) as f:
        for source, text in [*_topics_documents(), *_docstring_documents(stdlib)]:
            line = json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"
            data = line.encode("utf-8")
            f.write(data)
            n_docs, n_chars, n_bytes = n_docs + 1, n_chars + len(text), n_bytes + len(data)

    license_src = os.path.join(stdlib, "LICENSE.txt")
    if not os.path.isfile(license_src):
        raise FileNotFoundError(f"the stdlib license {license_src!r} is missing; cannot bundle")
    shutil.copyfile(license_src, os.path.join(args.output_dir, "LICENSE"))

    with open(out_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    logger.info(
        "wrote %s: %d documents, %d text chars, %d uncompressed bytes, %d gzip bytes, sha256 %s "
        "(python %s, stdlib %s)",
        out_path, n_docs, n_chars, n_bytes, os.path.getsize(out_path), digest,
        sys.version.split()[0], stdlib,
    )


if __name__ == "__main__":
    main()
