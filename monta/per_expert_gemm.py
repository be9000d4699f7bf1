"""The experts' GEMMs as one cuBLAS GEMM per expert, on row counts known to the host.

Transformer Engine's ``GroupedLinear`` works this way: the host splits the rows by expert and
launches a plain GEMM per expert. When each expert's GEMM is large, cuBLAS runs it at dense
speed, and that beats the grouped kernels (:mod:`monta.expert_gemm`). Those kernels take the
expert ends on the device, so they need no host sync, but they tile and schedule every expert
alike.

Measured on an H200 (``bench/gpu_moe.py``; the runs' JSON in ``bench/results/``), expert FFN
forward + backward, 8192 tokens, 4 calls back to back, interleaved:

* Mixtral shapes (8 experts, ~2048 rows each, a 240 GFLOP fc2 per expert): per-expert cuBLAS
  ran 3-4 % faster than the grouped default, its host sync included. The whole MoE layer, back
  to back, ran 27.6 instead of 29.4 ms (``gpu_moe_runs/gpu_moe_77a0c28.json``), 28.0 instead of
  29.4 ms at d68926f (``gpu_moe_runs/gpu_moe_d68926f.json``), 28.5 instead of 29.9 ms in the
  committed run (``gpu_moe.json``, 0993f04).
* Fine-grained shapes (64 experts, ~768 rows, 4.4 GFLOP per expert): it ran 2–3× slower. Each
  GEMM is then a few microseconds of work behind a launch.
* The 0.82 B training run (8 experts, 51 GFLOP per expert) lost with it: MFU 44.9 % with the
  GPU busy 90 % of the time (same JSON), against 48.6 % and 99 % on the grouped kernels in the
  runs before (``gpu_moe_runs/gpu_moe_8b43a16.json``). Its FFN gains too little per layer to
  pay for a sync in every layer's forward, which costs the host the lead it keeps over the GPU.

:func:`host_splits` decides, per call, whether the per-expert path runs. It reads
``MONTA_GROUPED_GEMM``:

* ``cublas``: always.
* unset (``default``): when the mean fc2 GEMM per local expert is at least
  :data:`MIN_EXPERT_GFLOP`. The rule uses the row count, which the host already knows, so the
  decision itself needs no sync.
* any other pin names a grouped kernel: never.

Where the counts live on the GPU (MoNTA's dispatcher), the path copies them to the host once
per forward; the backward reuses them. Megatron's alltoall dispatcher already hands them over on
the host. MoNTA's dispatcher starts that copy (:func:`prefetch_host_counts`) as soon as the
counts exist, before it queues the permutation, so the host then waits for the copy alone (an
event), not for the permutation behind it: while the host launches the first expert GEMM the GPU
still has the permutation to run, instead of idling after a stream sync.

Tried and dropped (d814a5a, H200): the forward on the grouped kernels and only the backward per
expert, which waits for nothing since the counts reach the host during the forward. The expert
FFN ran 1.5 % slower than per expert in both passes (27.07 vs 26.66 ms back to back at Mixtral
shapes, interleaved) and the layer no faster (27.97 ms back to back, against 28.08 ms for the
per-expert default in the run before): ``bench/results/gpu_moe_runs/gpu_moe_{d814a5a,e996c89}``.

Tried and dropped (ec2fc6a, H200): only fc1's forward on the grouped kernels, where the counts
come from the GPU, and the wait moved to fc2's forward, when the GPU still has fc1 queued. An
H200 trace of 8 Mixtral-shape layers back to back (``bench/results/gpu_moe_gaps.json``) had
shown the GPU idle 145–270 µs before each layer's first expert GEMM, which this removes. It
lost all the same, against megatron's 33.92 / 33.12 ms in the same interleaved rounds: 28.98 vs
28.50 ms one pass, 27.94 vs 27.63 ms back to back (``bench/gpu_count_wait.py``;
``bench/results/gpu_count_wait_runs/grouped_fc1_forward_ec2fc6a.json``). One profiled pass
(``bench/gpu_moe_gaps.py --shape mixtral`` at ec2fc6a, ``gaps_ec2fc6a.json`` beside it) has the
grouped fc1 forward at 5.19 ms; per expert, cuBLAS picks each expert's tile from its rows
(``128x304``, ``128x288``, ... in ``bench/results/gpu_moe.md``), the grouped kernel one for all.
"""

from __future__ import annotations

import torch

from monta.expert_gemm import CUBLAS, DEFAULT, kernel_pin
from monta.wgrad_overlap import WgradOverlap

# Per-expert GEMMs from this size up (2·rows/E·F·H FLOPs of fc2, the smaller projection),
# between the measured 51 GFLOP per expert (lost, in training) and 240 (won, in the layer).
MIN_EXPERT_GFLOP = 128.0


def per_expert_wanted(rows: int, w2_shape, pin: str) -> bool:
    """Whether ``rows`` routed rows through experts whose fc2 weight is ``w2_shape`` ``[E, F,
    H]`` run per expert under the ``MONTA_GROUPED_GEMM`` value ``pin`` (see module doc)."""
    if pin == CUBLAS:
        return True
    if pin != DEFAULT:
        return False
    experts, ffn, hidden = w2_shape
    return 2 * rows / experts * ffn * hidden / 1e9 >= MIN_EXPERT_GFLOP


class HostSplits:
    """The experts' row counts as host ints, read at the first :meth:`get`.

    The read waits for the GPU, and the GPU idles from the moment the counts arrive until the
    host launches the first expert GEMM. :class:`PerExpertMM` therefore calls :meth:`get` as
    late as it can: after the Python of the layer and the experts, and after allocating its
    output. In an H200 trace of the Mixtral-shape layer (``bench/gpu_moe_gaps.py
    --keep-trace``, a585d89), the host needed ~120 µs from the end of the wait to reach
    ``PerExpertMM``, and ~200 µs more to launch the first GEMM. Timed against the wait at the
    experts' entry, interleaved, in three runs (``bench/gpu_count_wait.py`` at 792025a, its
    scratch predecessor at 5dbde7c and 8da2e78: ``bench/results/gpu_count_wait*``), 8 layers
    back to back ran 27.74 vs 27.94, 27.71 vs 27.83 and 27.21 vs 27.35 ms;
    one layer at a time, 28.50 vs 28.52, 28.59 vs 28.52 and 28.14 vs 27.74 ms.

    Tried and dropped: polling the copy's event from Python instead of ``cudaEventSynchronize``
    (8da2e78). Under the profiler, every host operation right after a ~17 ms synchronize ran up
    to 10× slower than a few hundred µs later, and polling halved the GPU's idle there
    (~300 → ~150 µs per pass). Untraced it bought nothing that the noise did not swamp: one
    layer 28.04 vs 28.59 ms, then 27.80 vs 28.14 ms; 8 back to back 27.76 vs 27.71, then 27.29
    vs 27.21 ms. Polling also burns a core and hides the wait from torch's sync accounting."""

    def __init__(self, tokens_per_expert, rows: int, experts: int):
        self._counts, self._rows, self._experts = tokens_per_expert, rows, experts
        self._splits = None

    def get(self) -> list[int]:
        if self._splits is None:
            prefetched = getattr(self._counts, "host_copy", None)
            if prefetched is not None:
                host, copied = prefetched
                copied.synchronize()
                splits = host.tolist()
            else:
                splits = torch.as_tensor(self._counts).tolist()  # a sync if they are on the GPU
            if len(splits) != self._experts or sum(splits) != self._rows:
                raise ValueError(f"tokens_per_expert {splits} must give each of the "
                                 f"{self._experts} local experts a count, summing to the "
                                 f"{self._rows} rows")
            self._splits = splits
        return self._splits


def host_splits(x: torch.Tensor, w2: torch.Tensor, tokens_per_expert) -> HostSplits | None:
    """The experts' row counts, to be read on the host (:class:`HostSplits`), when the FFN of
    ``x [n, H]`` whose fc2 weight is ``w2 [E, F, H]`` should run per expert
    (:func:`per_expert_wanted`), else None. Only on GPUs (CPU has its own loop) and not on
    padded rows (``tokens_per_expert.row_ends`` with an alignment: their layout is the grouped
    kernels')."""
    if not x.is_cuda or not per_expert_wanted(x.size(0), w2.shape, kernel_pin()):
        return None
    if getattr(getattr(tokens_per_expert, "row_ends", None), "alignment", None):
        return None
    return HostSplits(tokens_per_expert, x.size(0), w2.size(0))


def prefetch_host_counts(tokens_per_expert: torch.Tensor, rows: int, w2_shape) -> None:
    """Start copying ``tokens_per_expert`` (on the GPU) to pinned host memory when ``rows``
    routed rows through experts whose fc2 weight is ``w2_shape`` will run per expert
    (:func:`per_expert_wanted`); :func:`host_splits` then waits on this copy's event only."""
    if not tokens_per_expert.is_cuda or not per_expert_wanted(rows, w2_shape, kernel_pin()):
        return
    host = torch.empty(tokens_per_expert.shape, dtype=tokens_per_expert.dtype, pin_memory=True)
    host.copy_(tokens_per_expert, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    tokens_per_expert.host_copy = (host, copied)


def _row_blocks(splits: list[int]):
    start = 0
    for expert, count in enumerate(splits):
        yield expert, start, start + count
        start += count


class PerExpertMM(torch.autograd.Function):
    """``out[rows_e] = x[rows_e] @ w[e]`` with one ``torch.mm`` per expert, each writing its
    block of rows in place (no concatenation); empty experts get zero weight gradients."""

    @staticmethod
    def forward(ctx, x, w, splits):
        out = x.new_empty(x.size(0), w.size(2))
        if isinstance(splits, HostSplits):
            splits = splits.get()  # the wait, with only the GEMM launches left after it
        for expert, start, end in _row_blocks(splits):
            if end > start:
                torch.mm(x[start:end], w[expert], out=out[start:end])
        ctx.save_for_backward(x, w)
        ctx.splits = splits
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        dx = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        dw = w.new_empty(w.shape) if ctx.needs_input_grad[1] else None
        overlap = WgradOverlap(dy)
        for expert, start, end in _row_blocks(ctx.splits):
            if dx is not None and end > start:
                torch.mm(dy[start:end], w[expert].t(), out=dx[start:end])
        if dw is not None:
            with overlap.side():
                for expert, start, end in _row_blocks(ctx.splits):
                    if end > start:
                        torch.mm(x[start:end].t(), dy[start:end], out=dw[expert])
                    else:
                        dw[expert].zero_()
        overlap.join()
        return dx, dw, None


def per_expert_mm(x: torch.Tensor, w: torch.Tensor, splits) -> torch.Tensor:
    """Differentiable ``x [n, K] @ w [E, K, N]`` by expert row blocks of sizes ``splits`` (a
    list of ints, or :class:`HostSplits` read once the output is allocated)."""
    return PerExpertMM.apply(x, w, splits)
