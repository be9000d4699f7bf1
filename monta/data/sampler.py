"""A deterministic, resumable, data-parallel batch sampler (cf. Megatron's
``MegatronPretrainingSampler``).

The global sample stream is ``n = consumed_samples, consumed_samples + 1, ...``, read as dataset
index ``n % total_samples`` (wrapping around when the dataset is exhausted). It is cut into
chunks of ``micro_batch_size * dp_size`` samples; DP rank ``r`` takes the ``r``-th slice of
``micro_batch_size`` in each chunk. So a run resumed at ``consumed_samples = k * global_batch``
sees exactly the batches an uninterrupted run sees from step ``k`` on, and ranks are disjoint.
"""

import logging
from typing import Iterator, List

logger = logging.getLogger(__name__)


class PretrainingSampler:
    """Yields this DP rank's micro-batches of dataset indices, forever.

    Args:
        total_samples: length of the dataset (indices are taken modulo it).
        consumed_samples: global samples already consumed (all DP ranks together); must be a
            multiple of ``micro_batch_size * data_parallel_size``.
        micro_batch_size: samples per micro-batch per rank.
        data_parallel_rank: this rank in ``[0, data_parallel_size)``.
        data_parallel_size: number of DP ranks.

    Yields:
        ``[micro_batch_size]`` lists of int indices.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be > 0, got {total_samples} (empty dataset?)")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError(
                f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                f"({data_parallel_size}) must be > 0"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank ({data_parallel_rank}) must be in "
                f"[0, data_parallel_size={data_parallel_size})"
            )
        step = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % step != 0:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be >= 0 and a multiple of "
                f"micro_batch_size * data_parallel_size = {micro_batch_size} * "
                f"{data_parallel_size} = {step}"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self._warned_wrap = False

    def _warn_wrap_once(self, n: int) -> None:
        if not self._warned_wrap:
            self._warned_wrap = True
            logger.warning(
                "data exhausted: sample %d of a dataset of %d samples; wrapping around "
                "(epoch %d repeats the same order; request more samples to avoid this)",
                n, self.total_samples, n // self.total_samples + 1,
            )

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.data_parallel_size
        first = self.data_parallel_rank * self.micro_batch_size
        n = self.consumed_samples  # global position of this chunk's first sample
        while True:
            if n + step > self.total_samples:
                self._warn_wrap_once(n + step - 1)
            span = range(first, first + self.micro_batch_size)
            yield [(n + j) % self.total_samples for j in span]
            n += step
