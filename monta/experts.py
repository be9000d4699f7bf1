"""Grouped-GEMM experts without the ``grouped_gemm`` package: one GEMM per projection.

Under ``--moe-grouped-gemm`` megatron-core's local spec asks for ``GroupedMLP``, which needs the
``grouped_gemm`` CUDA extension (not installed on our GPU image; TE's ``TEGroupedMLP`` is used
instead whenever Transformer Engine imports, see :mod:`monta.model`). :class:`MoNTAGroupedMLP`
*is* a ``GroupedMLP`` — same parameters (``weight1 [H, E·2F/ETP]`` viewed as ``[E, H, 2F/ETP]``,
``weight2 [E·F/ETP, H]`` viewed as ``[E, F/ETP, H]``), same initialisation, expert-TP sharding
and ``sharded_state_dict`` (whose keys and global shapes equal ``SequentialMLP``'s, so
``torch_dist`` checkpoints move between the two) — but computes each projection for all local
experts with one grouped GEMM on CUDA in bf16 (``torch._grouped_mm``'s CUTLASS kernel, or on
Hopper MoNTA's own CUTLASS build with 128-row granularity when ``tools/build_sm90_kernels.py``
has built it; :mod:`monta.expert_gemm` says which and how to choose), and with a loop of
``torch.mm`` elsewhere (CPU, fp32, or dims that break its 16-byte alignment). SwiGLU × router
probability runs in fc1's epilogue on Hopper (:mod:`monta.swiglu_gemm`, ``MONTA_FUSED_SWIGLU``)
and otherwise, and in the backward, as one Triton kernel each way on GPUs (:mod:`monta.swiglu`).

Large experts run one cuBLAS GEMM each instead (:mod:`monta.per_expert_gemm`, as Transformer
Engine's ``GroupedLinear`` does): at Mixtral shapes that is faster, though it needs the counts
on the host. Otherwise there is no host sync: ``torch._grouped_mm`` and MoNTA's kernels take
the experts' row *ends* as an int32 tensor on the device, so counts that arrive on the GPU
(MoNTA's dispatcher) stay there. The loop fallback (the same per-expert GEMMs) needs them on
the host, which is a sync on a GPU; on CPU it is free.

In every path the backward queues each projection's weight gradient on a second CUDA stream,
beside the input gradient that the rest of the backward waits for (:mod:`monta.wgrad_overlap`).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe import grouped_gemm_util
from megatron.core.transformer.moe.experts import GroupedMLP

from monta import expert_gemm, per_expert_gemm, swiglu_gemm

logger = logging.getLogger(__name__)

# torch._grouped_mm's CUTLASS path reads rows with 16-byte TMA loads: every row stride must be
# a multiple of 16 bytes, i.e. of 8 bf16 elements (checked on the real strides).
_ALIGN_BYTES = 16


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs ``x [n, K] @ w [E, K, N]`` as one fast kernel here.

    CUDA bf16 only: on other dtypes/devices torch falls back to its own per-group loop, which
    copies the offsets to the host anyway, so our explicit loop is no worse and is portable.
    """
    if not (x.is_cuda and w.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    size = x.element_size()
    return (x.stride(0) * size % _ALIGN_BYTES == 0 and w.size(-1) * size % _ALIGN_BYTES == 0
            and x.data_ptr() % _ALIGN_BYTES == 0 and w.data_ptr() % _ALIGN_BYTES == 0)


def expert_offsets(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 end row of each expert's group, on ``device`` (what ``torch._grouped_mm`` takes).

    Counts already on ``device`` stay there (no sync). Host counts (megatron's alltoall
    dispatcher copies them to the host for its own split sizes) go up through pinned memory, so
    the copy is queued on the stream instead of waiting for it. Counts from MoNTA's routing
    kernel carry their row ends, computed in the same launch (``row_ends``, see
    monta/dispatch/routed_order.py): one launch fewer before the first GEMM.
    """
    row_ends = getattr(tokens_per_expert, "row_ends", None)
    if row_ends is not None:  # may be padded (monta/dispatch/padded_order.py): never recount
        # .to is itself when already there ("cuda" is "cuda:0")
        return expert_gemm.with_alignment(row_ends.to(device),
                                          getattr(row_ends, "alignment", None))
    offsets = torch.cumsum(torch.as_tensor(tokens_per_expert), 0, dtype=torch.int32)
    if offsets.device.type == "cpu" and device.type == "cuda":
        offsets = offsets.pin_memory().to(device, non_blocking=True)
    return offsets.to(device)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
               offsets: torch.Tensor | None = None, force_loop: bool = False) -> torch.Tensor:
    """``out[rows of expert e] = x[rows of expert e] @ w[e]``; rows are grouped by expert.

    Args:
        x: [n, K], rows sorted by expert (expert 0's first), n = sum(tokens_per_expert); or
            each expert's rows starting at a multiple of an alignment, when
            ``tokens_per_expert.row_ends`` holds such padded ends (monta/dispatch/
            padded_order.py), n then a capacity past the last end.
        w: [E, K, N].
        tokens_per_expert: [E] integer counts (host or device; zeros allowed).
        offsets: :func:`expert_offsets` of the counts, if the caller already has it.
        force_loop: take the per-expert loop even where the grouped kernel runs (tests).
    Returns:
        [n, N], differentiable in ``x`` and ``w`` (empty experts get zero weight gradients).
    """
    if not force_loop and grouped_mm_supported(x, w):
        if offsets is None:
            offsets = expert_offsets(tokens_per_expert, x.device)
        return expert_gemm.grouped_mm(x, w, offsets)
    padded_ends = _padded_ends(tokens_per_expert)
    if padded_ends is None:
        counts = torch.as_tensor(tokens_per_expert).tolist()  # host ints: a sync if on a GPU
        return per_expert_gemm.per_expert_mm(x, w, counts)
    # rows padded per expert (monta/dispatch/padded_order.py); rows past the last end are never
    # read, zero here
    ends = padded_ends.tolist()
    out = per_expert_gemm.per_expert_mm(x[:ends[-1]], w, [b - a for a, b in zip([0, *ends], ends)])
    return torch.cat([out, out.new_zeros(x.size(0) - ends[-1], out.size(1))])


def _padded_ends(tokens_per_expert) -> torch.Tensor | None:
    ends = getattr(tokens_per_expert, "row_ends", None)
    return ends if getattr(ends, "alignment", None) else None


@contextlib.contextmanager
def _without_grouped_gemm_check():
    """``GroupedMLP.__init__`` asserts that the ``grouped_gemm`` package imports, though only
    its forward uses it; we replace that forward, so skip the check while constructing."""
    original = grouped_gemm_util.assert_grouped_gemm_is_available
    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None
    try:
        yield
    finally:
        grouped_gemm_util.assert_grouped_gemm_is_available = original


class MoNTAGroupedMLP(GroupedMLP):
    """megatron-core's ``GroupedMLP`` computed with ``torch._grouped_mm`` (see module doc)."""

    def __init__(self, num_local_experts, config, pg_collection=None):
        with _without_grouped_gemm_check():
            super().__init__(num_local_experts, config, pg_collection=pg_collection)
        self._glu = bool(config.gated_linear_unit)

    def _activation(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return activation_with_probs(x, probs, self.config.activation_func, self._glu)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        """Same contract as ``GroupedMLP.forward``: returns (output [n, H], None)."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input only works with moe_router_topk = 1")
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        probs = probs.unsqueeze(-1)
        if self.activation_recompute:
            from megatron.core import tensor_parallel

            self.activation_checkpoint = tensor_parallel.CheckpointWithoutOutput()
        hidden = self.config.hidden_size
        if x.nelement() == 0:
            # No rows here: one plain matmul chain over all experts' weights keeps every
            # parameter in the graph, so its (zero) gradient exists like on busy ranks.
            w1, w2 = self.weight1.view(hidden, -1), self.weight2.view(-1, hidden)
            return self._mlp(x, probs, lambda t: t @ w1, lambda t: t @ w2), None
        w1 = self.weight1.view(self.num_local_experts, hidden, -1)
        w2 = self.weight2.view(self.num_local_experts, -1, hidden)
        splits = per_expert_gemm.host_splits(x, w2, tokens_per_expert)
        if splits is not None:
            return self._mlp(x, probs, lambda t: per_expert_gemm.per_expert_mm(t, w1, splits),
                             lambda t: per_expert_gemm.per_expert_mm(t, w2, splits)), None
        offsets = None
        if grouped_mm_supported(x, w1):
            offsets = expert_offsets(tokens_per_expert, x.device)  # shared by both GEMMs
            fused = swiglu_gemm.fused_passes(x, offsets, w1)
            if fused != "0" and self._fusable(x, w1, w2, fused, offsets):
                try:
                    return swiglu_gemm.swiglu_expert_ffn(x, w1, w2, probs, offsets,
                                                         passes=fused), None
                except Exception as error:  # e.g. Triton cannot compile it for this GPU
                    _give_up("fused", error, fused if swiglu_gemm.fusion_asked() else "auto")
        return self._mlp(x, probs,
                         lambda t: grouped_mm(t, w1, tokens_per_expert, offsets),
                         lambda t: grouped_mm(t, w2, tokens_per_expert, offsets)), None

    def _fusable(self, x, w1, w2, passes: str, row_ends) -> bool:
        """SwiGLU·prob fused into the GEMMs (:mod:`monta.swiglu_gemm`) where the kernels of
        ``passes`` run and nothing asks for the activation on its own (recomputation
        checkpoints it)."""
        return (self._glu and self.config.activation_func is F.silu and "fused" not in _failed
                and not self.activation_recompute
                and swiglu_gemm.supported(x, w1, w2, passes, row_ends))

    def _mlp(self, x, probs, fc1, fc2):
        h = fc1(x)
        if self.activation_recompute:
            h = self.activation_checkpoint.checkpoint(self._activation, h, probs)
            out = fc2(h)
            self.activation_checkpoint.discard_output_and_register_recompute(out)
            return out
        return fc2(self._activation(h, probs))


def _activation_with_probs(x: torch.Tensor, probs: torch.Tensor, act, glu: bool) -> torch.Tensor:
    """GroupedMLP's ``activation_func_with_probs``: act(x) · probs, in x's dtype; for GLU each
    row is ``[gate | up]`` (megatron's layout, per expert-TP shard)."""
    if glu:
        gate, up = torch.chunk(x, 2, dim=-1)
        y = act(gate) * up
    else:
        y = act(x)
    return (y * probs).to(x.dtype)


# One compiled function for every layer. (GroupedMLP's own jit_fuser'd closure captures the
# module, so torch.compile would guard on and recompile for each layer, past its cache limit.)
_compiled_activation = None
_failed: set[str] = set()  # implementations that raised once here; not tried again


def activation_with_probs(x: torch.Tensor, probs: torch.Tensor, act, glu: bool,
                          impl: str = "auto") -> torch.Tensor:
    """act(x) · probs in x's dtype; ``impl``: ``auto`` (the first that applies of the
    following), ``triton`` (SwiGLU only, :mod:`monta.swiglu`), ``compiled`` (torch.compile),
    ``eager``.

    Eager, SwiGLU makes four passes over the [n, 2F] activations (silu, two products, the
    cast) forward and more backward; at Mixtral shapes that is milliseconds per layer. The
    compiled version marks only the row count dynamic (it changes from step to step under
    expert parallelism); inside the MoE layer on an H200 its backward still ran at ~0.7 TB/s
    (bench/results/gpu_moe.md times all three), hence the Triton kernels first. CPU stays eager
    (compiling there needs a C++ toolchain and buys nothing for tests).
    """
    global _compiled_activation
    on_gpu = x.is_cuda and x.size(0) > 1
    if impl in ("auto", "triton") and glu and act is F.silu and "triton" not in _failed:
        from monta import swiglu

        if swiglu.available(x):
            try:
                return swiglu.weighted_swiglu(x, probs)
            except Exception as error:  # e.g. Triton cannot compile on this host
                _give_up("triton", error, impl)
    if impl in ("auto", "compiled") and on_gpu and "compiled" not in _failed:
        try:
            if _compiled_activation is None:
                _compiled_activation = torch.compile(_activation_with_probs)
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(probs, 0)
            return _compiled_activation(x, probs, act, glu)
        except Exception as error:  # e.g. no working compiler for Triton on this host
            _give_up("compiled", error, impl)
    return _activation_with_probs(x, probs, act, glu)


def _give_up(impl: str, error: Exception, asked: str) -> None:
    if asked != "auto":
        raise error
    logger.warning("%s expert activation unavailable (%s: %s); using the next one", impl,
                   type(error).__name__, error)
    _failed.add(impl)


def copy_from_sequential(grouped: GroupedMLP, sequential: torch.nn.Module) -> None:
    """Load a ``SequentialMLP``'s local experts (same ETP shard) into ``grouped``'s weights.

    ``local_experts.e.linear_fc1.weight`` is ``[2F/ETP, H]`` and ``linear_fc2.weight``
    ``[H, F/ETP]``; the grouped views hold their transposes per expert.
    """
    hidden = grouped.config.hidden_size
    w1 = grouped.weight1.view(grouped.num_local_experts, hidden, -1)
    w2 = grouped.weight2.view(grouped.num_local_experts, -1, hidden)
    with torch.no_grad():
        for e, expert in enumerate(sequential.local_experts):
            w1[e].copy_(expert.linear_fc1.weight.t())
            w2[e].copy_(expert.linear_fc2.weight.t())
