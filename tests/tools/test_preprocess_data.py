"""Tests for tools/preprocess_data.py (in-process via main(argv), plus one real CLI run)."""

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy
import pytest

from monta.data.dataset import check_data_prefix
from monta.data.tokenizer import build_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLED_CORPUS = os.path.join(REPO_ROOT, "monta", "data", "bundled", "corpus.jsonl.gz")

DOCS = [
    "The assert statement is a convenient way to insert debugging assertions.",
    "",  # empty documents are skipped
    "Line one.\nLine two, with  two spaces and a tab\there.",
    "   ",  # whitespace-only too
    "Ünïcode — 日本語 🙂",
    "Short.",
]
NON_EMPTY = [d for d in DOCS if d.strip()]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location(
        "_tool_preprocess_data", os.path.join(REPO_ROOT, "tools", "preprocess_data.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so --workers > 1 can pickle its Encoder by reference
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _write_jsonl(path, docs, key="text", gz=False):
    lines = "".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(lines)
    return str(path)


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def _run(tool, inp, out, *extra):
    return tool.main(["--input", inp, "--output-prefix", str(out),
                      "--tokenizer-type", "SentencePieceTokenizer", *extra])


@pytest.mark.parametrize("append_eod", [True, False])
def test_jsonl_roundtrip(tool, tokenizer, tmp_path, append_eod):
    inp = _write_jsonl(tmp_path / "c.jsonl", DOCS)
    prefixes = _run(tool, inp, tmp_path / "out", *(["--append-eod"] if append_eod else []))
    assert prefixes == {"text": str(tmp_path / "out") + "_text_document"}
    ds, docs = _read(prefixes["text"])
    assert ds.index.dtype == numpy.uint16  # vocab 4096 < 65500
    eod = [tokenizer.eod] if append_eod else []
    assert docs == [tokenizer.tokenize(d) + eod for d in NON_EMPTY]
    assert len(ds.document_indices) == len(NON_EMPTY) + 1
    assert check_data_prefix(prefixes["text"]).num_documents == len(NON_EMPTY)


def test_txt_gz_blank_line_documents(tool, tokenizer, tmp_path):
    path = tmp_path / "c.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n\nfirst doc line 1\nfirst doc line 2\n\n\n  \nsecond doc\n\nthird\n")
    prefixes = _run(tool, str(path), tmp_path / "t", "--append-eod")
    _, docs = _read(prefixes["text"])
    expected = ["first doc line 1\nfirst doc line 2", "second doc", "third"]
    assert docs == [tokenizer.tokenize(d) + [tokenizer.eod] for d in expected]


def test_workers_and_multiple_keys(tool, tmp_path):
    rows = [
        {"text": f"document number {i} " * (i % 7 + 1), "title": f"Title {i}"} for i in range(100)
    ]
    inp = tmp_path / "c.jsonl.gz"
    with gzip.open(inp, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    one = _run(tool, str(inp), tmp_path / "w1", "--json-keys", "text", "title", "--append-eod")
    two = _run(tool, str(inp), tmp_path / "w2", "--json-keys", "text", "title", "--append-eod",
               "--workers", "2", "--log-interval", "10")
    for key in ("text", "title"):
        for ext in (".bin", ".idx"):
            with open(one[key] + ext, "rb") as a, open(two[key] + ext, "rb") as b:
                assert a.read() == b.read(), (key, ext)
    assert check_data_prefix(one["title"]).num_documents == 100


def test_missing_input(tool, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _run(tool, str(tmp_path / "nope.jsonl"), tmp_path / "o")


@pytest.mark.parametrize("content", ["", "\n\n", '{"text": ""}\n{"text": "  "}\n'])
def test_empty_input(tool, tmp_path, content):
    inp = tmp_path / "empty.jsonl"
    inp.write_text(content)
    with pytest.raises(ValueError, match="empty|no non-empty documents"):
        _run(tool, str(inp), tmp_path / "o")
    assert not list(tmp_path.glob("o_*"))  # no half-written dataset left behind


def test_unknown_json_key(tool, tmp_path):
    inp = _write_jsonl(tmp_path / "c.jsonl", ["hello"], key="content")
    with pytest.raises(ValueError, match=r"'text' not found.*\['content', 'id'\]"):
        _run(tool, inp, tmp_path / "o")
    assert not list(tmp_path.glob("o_*"))


def test_json_keys_with_txt_input(tool, tmp_path):
    inp = tmp_path / "c.txt"
    inp.write_text("hello\n")
    with pytest.raises(ValueError, match="only applies to .jsonl"):
        _run(tool, str(inp), tmp_path / "o", "--json-keys", "body")


def test_unsupported_tokenizer_type(tool, tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "c.jsonl", ["hello"])
    with pytest.raises(SystemExit):
        tool.main(["--input", inp, "--output-prefix", str(tmp_path / "o"),
                   "--tokenizer-type", "GPT2BPETokenizer"])
    assert "GPT2BPETokenizer is not supported" in capsys.readouterr().err


def test_missing_tokenizer_model(tool, tmp_path):
    inp = _write_jsonl(tmp_path / "c.jsonl", ["hello"])
    with pytest.raises(FileNotFoundError, match="missing.model"):
        _run(tool, inp, tmp_path / "o", "--tokenizer-model", str(tmp_path / "missing.model"))


def test_cli_on_bundled_corpus(tmp_path):
    """The real command line, from the repo root, without PYTHONPATH: the whole bundled corpus."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", BUNDLED_CORPUS,
         "--output-prefix", str(tmp_path / "bundled"), "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", "monta/data/bundled/tokenizer.model", "--append-eod",
         "--workers", "2"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 60, elapsed
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        num_docs = sum(1 for _ in f)
    summary = check_data_prefix(str(tmp_path / "bundled_text_document"))
    assert summary.num_documents == num_docs and summary.num_tokens > 500_000
