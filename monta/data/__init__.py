"""MoNTA data pipeline: tokenizer, preprocessed (.bin/.idx) datasets and batch iterators.

Modules:
    tokenizer: ``SentencePieceTokenizer`` / ``build_tokenizer`` over a sentencepiece ``.model``.
    dataset:   ``check_data_prefix``, ``build_gpt_datasets`` (megatron-core ``GPTDataset`` splits),
               ``PretrainingSampler`` and ``build_data_iterator`` (resumable, DP-sharded batches).

The bundled corpus and tokenizer live in ``monta/data/bundled/`` (see its README.md).
"""
