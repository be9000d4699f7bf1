"""Tests for monta.data.tokenizer and the bundled tokenizer/corpus."""

import gzip
import importlib.util
import json
import os
from collections import OrderedDict

import pytest

from monta.data.tokenizer import BUNDLED_TOKENIZER_MODEL, SentencePieceTokenizer, build_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLED_DIR = os.path.join(REPO_ROOT, "monta", "data", "bundled")


def _load_tool(name):
    path = os.path.join(REPO_ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_bundled_tokenizer_properties(tokenizer):
    assert tokenizer.model_path == os.path.abspath(BUNDLED_TOKENIZER_MODEL)
    assert tokenizer.vocab_size == 4096
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eod, tokenizer.pad) == (0, 1, 2, 3)
    assert tokenizer.eos == tokenizer.eod
    ids = tokenizer.unique_identifiers
    assert isinstance(ids, OrderedDict)
    assert ids["class"] == "SentencePieceTokenizer"
    assert ids["tokenizer_path"] == tokenizer.model_path
    json.dumps(ids)  # megatron-core hashes it through json.dumps


@pytest.mark.parametrize(
    "text",
    [
        "The assert statement is a convenient way to insert debugging assertions.",
        "  indented\n\tcode = 1\n\n",
        " leading and trailing  ",
        "héllo — ünïcode 日本語 🙂 \x00",
        "",
        "a\r\nb",
    ],
)
def test_roundtrip(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.detokenize(ids) == text


def test_tokenize_never_emits_specials(tokenizer):
    ids = tokenizer.tokenize("<s> </s> <pad> <unk> text")
    assert not {tokenizer.bos, tokenizer.eod, tokenizer.pad, tokenizer.unk} & set(ids)


def test_missing_model_file(tmp_path):
    path = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model") as info:
        SentencePieceTokenizer(path)
    assert "--tokenizer-model" in str(info.value)
    assert "monta/data/bundled/tokenizer.model" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"this is not a protobuf\x00\xff" * 10])
def test_corrupt_model_file(tmp_path, content):
    path = tmp_path / "bad.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.model") as info:
        build_tokenizer(str(path))
    assert "--tokenizer-model" in str(info.value)


def test_model_without_pad_uses_eod(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    spm.SentencePieceTrainer.Train(
        input=str(text), model_prefix=str(tmp_path / "nopad"), vocab_size=40,
        model_type="bpe", pad_id=-1, minloglevel=2,
    )
    tok = SentencePieceTokenizer(str(tmp_path / "nopad.model"))
    assert tok.pad == tok.eod == 2


def test_train_tokenizer_tool_is_deterministic(tmp_path):
    tool = _load_tool("train_tokenizer")
    corpus = tmp_path / "c.txt"
    with gzip.open(os.path.join(BUNDLED_DIR, "corpus.jsonl.gz"), "rt", encoding="utf-8") as f:
        docs = [json.loads(next(f))["text"] for _ in range(40)]
    corpus.write_text("\n\n".join(docs), encoding="utf-8")
    a = SentencePieceTokenizer(tool.train([str(corpus)], str(tmp_path / "a"), 600))
    b = SentencePieceTokenizer(tool.train([str(corpus)], str(tmp_path / "b"), 600))
    assert a.vocab_size == 600 and (a.eod, a.pad) == (2, 3)
    pieces = lambda t: [t._sp.IdToPiece(i) for i in range(t.vocab_size)]  # noqa: E731
    assert pieces(a) == pieces(b)
    assert a.detokenize(a.tokenize(docs[0])) == docs[0]
    with pytest.raises(ValueError, match="--vocab-size 256"):
        tool.train([str(corpus)], str(tmp_path / "c"), 256)


def test_bundled_corpus(tokenizer):
    for name in ("corpus.jsonl.gz", "LICENSE", "README.md", "tokenizer.model"):
        assert os.path.isfile(os.path.join(BUNDLED_DIR, name)), name
    with gzip.open(os.path.join(BUNDLED_DIR, "corpus.jsonl.gz"), "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    assert len(docs) > 500 and 2_000_000 <= n_bytes <= 5_000_000, (len(docs), n_bytes)
    assert all(d["text"].strip() and d["source"] for d in docs)
    for doc in docs[::50]:
        assert tokenizer.detokenize(tokenizer.tokenize(doc["text"])) == doc["text"]
