"""A Mixtral/Llama-style sentencepiece model works as ``--tokenizer-model`` as it is.

Mixtral's ``tokenizer.model``: BPE with byte fallback, ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 and
no pad piece. The stand-in below is trained with the same special-id layout.
"""

from __future__ import annotations

import gzip
import json

import pytest

from monta.data.tokenizer import SentencePieceTokenizer
from tests.conftest import BUNDLED_CORPUS


@pytest.fixture(scope="module")
def llama_style_model(tmp_path_factory) -> str:
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("llama_sp")
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        text = [json.loads(line)["text"] for _, line in zip(range(300), f)]
    (root / "corpus.txt").write_text("\n".join(text))
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "llama"), vocab_size=800,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    return str(root / "llama.model")


def test_llama_style_special_ids(llama_style_model):
    tokenizer = SentencePieceTokenizer(llama_style_model)
    assert tokenizer.vocab_size == 800
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eod, tokenizer.eos) == (0, 1, 2, 2)
    assert tokenizer.pad == tokenizer.eod == 2  # no pad piece: pad falls back to end-of-document
    ids = tokenizer.tokenize("Mixture of experts ✓")
    assert 1 not in ids and 2 not in ids  # no BOS/EOS added; the data pipeline appends EOD
    assert tokenizer.detokenize(ids) == "Mixture of experts ✓"  # ✓ via byte fallback
