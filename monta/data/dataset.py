"""GPT pretraining data: megatron-core ``GPTDataset`` splits and resumable DP batch iterators.

Shape legend: B = micro-batch size, S = sequence length.

Typical use (every rank, with or without torch.distributed initialised)::

    for prefix in prefixes: check_data_prefix(prefix)          # cheap, before any collective
    train, valid, test = build_gpt_datasets(["data/corpus_text_document"], "949,50,1",
                                            seq_length=256, seed=1234,
                                            num_samples=(iters * gbs, 0, 0), tokenizer=tok)
    it = build_data_iterator(train, micro_batch_size, dp_rank, dp_size, consumed_samples)
    batch = next(it)  # {"tokens", "labels", "loss_mask", "position_ids"}: [B, S] tensors
"""

import logging
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from monta.data.indexed import IndexSummary, check_data_prefix
from monta.data.sampler import PretrainingSampler

__all__ = [
    "IndexSummary",
    "PretrainingSampler",
    "build_data_iterator",
    "build_gpt_datasets",
    "check_data_prefix",
    "collate_gpt_samples",
    "parse_data_path",
]

logger = logging.getLogger(__name__)

_SPLIT_NAMES = ("train", "valid", "test")
_BATCH_KEYS = {  # key -> dtype of the collated [B, S] tensor
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "position_ids": torch.int64,
}


def parse_data_path(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Parse Megatron's ``--data-path``: ``[prefix, ...]`` or ``[w1, prefix1, w2, prefix2, ...]``.

    Returns:
        ``(prefixes, weights)``; ``weights`` is None when none were given.
    """
    items = [str(x).strip() for x in data_path]
    if not items:
        raise ValueError("data_path is empty; pass --data-path PREFIX or W1 PREFIX1 W2 PREFIX2")

    def as_float(x: str) -> Optional[float]:
        try:
            return float(x)
        except ValueError:
            return None

    numeric = [as_float(x) is not None for x in items]
    if not any(numeric):
        return items, None
    if len(items) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise ValueError(
            f"data_path {items} mixes weights and prefixes; expected [PREFIX, ...] or "
            f"[W1, PREFIX1, W2, PREFIX2, ...]"
        )
    weights = [as_float(w) for w in items[0::2]]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data_path weights {weights} must be >= 0 with a positive sum")
    return items[1::2], weights


def _split_matrix(split: str) -> List[Optional[Tuple[float, float]]]:
    """Validate ``split`` ("949,50,1") and return megatron-core's split matrix for it."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    parts = [p.strip() for p in str(split).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(
            f"split {split!r} must be 1-3 comma-separated non-negative weights with a positive "
            f"sum (train,valid,test), e.g. '949,50,1'"
        )
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(str(split)))


def _drop_empty_splits(
    matrix: List[Optional[Tuple[float, float]]],
    summaries: List[IndexSummary],
    num_samples: Sequence[int],
    split: str,
) -> List[Optional[Tuple[float, float]]]:
    """Set splits that get no documents to None, or raise if samples were requested from them.

    megatron-core 0.16.1 loops forever in ``GPTDataset._get_num_epochs`` for a split with zero
    documents (it adds 0 tokens per epoch until it has ``num_samples * S + 1``).
    """
    matrix = list(matrix)
    for i, bounds in enumerate(matrix):
        if bounds is None:
            continue
        # Same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
        counts = {
            s.prefix: int(round(bounds[1] * s.num_sequences))
            - int(round(bounds[0] * s.num_sequences))
            for s in summaries
        }
        empty = [p for p, c in counts.items() if c == 0]
        if not empty:
            continue
        if len(empty) == len(counts) and num_samples[i] == 0:
            logger.info("split %r gives the %s split no documents: None", split, _SPLIT_NAMES[i])
            matrix[i] = None
            continue
        raise ValueError(
            f"split {split!r} gives the {_SPLIT_NAMES[i]} split 0 documents of {empty} "
            f"(documents per prefix: {counts}, {num_samples[i]} samples requested); use a split "
            f"with a larger {_SPLIT_NAMES[i]} share, more data, or request 0 samples from it"
        )
    return matrix


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def build_gpt_datasets(
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: Tuple[int, int, int],
    tokenizer,
    cache_dir: Optional[str] = None,
):
    """Build the train/valid/test ``GPTDataset`` (or ``BlendedDataset``) splits.

    Call it on every rank. Without torch.distributed each process builds alone; with it, the
    builder's barriers are collective on the default group, so every rank must call this.
    Every rank builds its own copy (``is_built_on_rank=lambda: True``); with the default
    ``cache_dir=None`` the indices live in memory only and nothing is written to disk.

    Args:
        data_path: ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]`` (``.bin``/``.idx`` pairs).
        split: train,valid,test weights, e.g. ``"949,50,1"``.
        seq_length: S, tokens per sample (each sample reads S + 1 tokens).
        seed: seed of the document/sample shuffles.
        num_samples: samples to draw per split, e.g. ``(train_iters * global_batch, ...)``;
            datasets repeat documents (new shuffle per epoch) to reach it.
        tokenizer: needs ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers``.
        cache_dir: where megatron-core may cache its .npy indices (must be on a filesystem all
            ranks share when torch.distributed is initialised: rank 0 writes, the rest read).

    Returns:
        ``(train, valid, test)``; a split whose share is 0 is None. Samples are dicts of
        ``tokens``/``labels`` int64 ``[S]``, ``loss_mask`` float32 ``[S]``, ``position_ids``.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if seq_length <= 0:
        raise ValueError(f"seq_length must be > 0, got {seq_length}")
    num_samples = tuple(int(n) for n in num_samples)
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(
            f"num_samples must be 3 non-negative ints (train, valid, test), got {num_samples}"
        )
    prefixes, weights = parse_data_path(data_path)
    summaries = [check_data_prefix(p) for p in prefixes]
    matrix = _drop_empty_splits(_split_matrix(split), summaries, num_samples, split)

    blended = len(prefixes) > 1 or weights is not None
    if cache_dir and blended and not torch.distributed.is_initialized():
        # megatron-core 0.16.1 BlendedDataset._build_indices calls torch.distributed.get_rank()
        # on a cache miss without checking is_initialized() -> "Default process group has not
        # been initialized". Build in memory instead.
        logger.warning(
            "cache_dir=%r ignored: blends without torch.distributed build in memory", cache_dir
        )
        cache_dir = None

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        # "" (not None): None makes GPTDataset cache under PREFIX/cache/; "" keeps it in memory.
        path_to_cache=cache_dir or "",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model builds its own causal mask
    )
    config.split_matrix = matrix  # with empty splits set to None

    quiet = _DropMessages("Unable to save", "Cannot save")  # expected without a cache dir
    loggers = [
        logging.getLogger(f"megatron.core.datasets.{m}") for m in ("gpt_dataset", "blended_dataset")
    ]
    if not cache_dir:
        for lg in loggers:
            lg.addFilter(quiet)
    try:
        datasets = BlendedMegatronDatasetBuilder(
            GPTDataset, list(num_samples), lambda: True, config
        ).build()
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)
    logger.info(
        "built GPT datasets from %s (weights %s), split %r: %s samples",
        prefixes, weights, split,
        {n: (len(d) if d is not None else None) for n, d in zip(_SPLIT_NAMES, datasets)},
    )
    return tuple(datasets)


def collate_gpt_samples(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack ``B`` GPTDataset samples into ``[B, S]`` tensors (other keys are dropped)."""
    lengths = {int(s["tokens"].shape[0]) for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"samples have different sequence lengths {sorted(lengths)}")
    return {
        key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(dtype)  # [B, S]
        for key, dtype in _BATCH_KEYS.items()
    }


def build_data_iterator(
    dataset,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int,
) -> Iterator[Dict[str, torch.Tensor]]:
    """An endless iterator of this DP rank's micro-batches, resumable at ``consumed_samples``.

    Args:
        dataset: a split from ``build_gpt_datasets`` (any map-style dataset of sample dicts).
        micro_batch_size: B.
        dp_rank, dp_size: this rank's data-parallel coordinates.
        consumed_samples: global samples already consumed (a multiple of B * dp_size).

    Returns:
        An iterator of dicts with ``tokens``/``labels``/``position_ids`` int64 ``[B, S]`` and
        ``loss_mask`` float32 ``[B, S]``. It wraps around (warning once) past the dataset's end.
    """
    if dataset is None or len(dataset) == 0:
        raise ValueError(
            f"cannot iterate an empty dataset ({dataset!r}); request samples for this split "
            f"(num_samples) or give it a non-zero share in --split"
        )
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    # A private generator: creating the iterator draws a seed from it, which from the global
    # one would shift the model's RNG stream (dropout) by one draw in a resumed run only.
    # Pinned on GPU hosts, so the step copies batches up without waiting for the GPU.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=0, collate_fn=collate_gpt_samples,
        generator=torch.Generator(), pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)
