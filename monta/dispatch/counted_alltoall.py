"""megatron-core's stock ``alltoall`` dispatcher, with MoNTA's per-link byte counters.

Behaviour is untouched: every method calls megatron's own; we only record, after each
collective, the rows this rank sent to each peer (forward) and, through gradient hooks, the rows
its backward sends. Tags match :mod:`monta.dispatch.monta_dispatcher` so the two compare
phase by phase.
"""

from __future__ import annotations

from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from monta import comm
from monta.dispatch.stats import timed


def _as_ints(splits) -> list[int]:
    return [int(n) for n in (splits.tolist() if hasattr(splits, "tolist") else splits)]


def _splits_or_even(splits, rows: int, parts: int) -> list[int]:
    """megatron leaves the EP splits None in drop-and-pad mode: the all-to-all is then even."""
    return [rows // parts] * parts if splits is None else _as_ints(splits)


class CountedAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """The baseline: megatron's flat all-to-all (one copy per (token, expert))."""

    layer_number = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from monta.parallel import get_topology

        self.topology = get_topology()

    def _tag(self, phase: str) -> str:
        return f"layer{self.layer_number or 0}/{phase}"

    def _count(self, rows, row_bytes, group, phase) -> None:
        comm.count_sends(rows, row_bytes, group=group, topology=self.topology,
                         tag=self._tag(phase))

    def _count_on_backward(self, tensor, rows, group, phase) -> None:
        """Count what the backward of the collective that produced ``tensor`` will send."""
        if tensor.requires_grad:
            row_bytes = tensor[0:1].numel() * tensor.element_size()
            tensor.register_hook(lambda grad: self._count(rows, row_bytes, group, phase + "/bwd"))

    @timed("dispatch")
    def token_dispatch(self, tokens, probs):
        out_tokens, out_probs = super().token_dispatch(tokens, probs)
        if self.ep_size > 1:
            sent = _splits_or_even(self.input_splits, tokens.size(0), self.ep_size)
            received = _splits_or_even(self.output_splits, out_tokens.size(0), self.ep_size)
            self._count(sent, tokens[0:1].numel() * tokens.element_size(), self.ep_group,
                        "dispatch/flat")
            self._count(sent, probs.element_size(), self.ep_group, "dispatch/flat/meta")
            self._count_on_backward(out_tokens, received, self.ep_group, "dispatch/flat")
        return out_tokens, out_probs

    @timed("dispatch")
    def dispatch_postprocess(self, tokens, probs):
        if self.tp_size > 1:
            row_bytes = tokens[0:1].numel() * tokens.element_size()
            self._count([tokens.size(0)] * self.tp_size, row_bytes, self.tp_group,
                        "dispatch/etp_gather")
            # backward: a reduce-scatter sends every peer its own rows' gradient, and it has
            # arrived when this input's gradient does
            peers = (_as_ints(self.output_splits_tp) if self.output_splits_tp is not None
                     else [tokens.size(0)] * self.tp_size)
            if tokens.requires_grad:
                tokens.register_hook(lambda grad: self._count(
                    peers, row_bytes, self.tp_group, "dispatch/etp_gather/bwd"))
        return super().dispatch_postprocess(tokens, probs)

    @timed("combine")
    def combine_preprocess(self, hidden_states):
        out = super().combine_preprocess(hidden_states)
        if self.tp_size > 1:
            splits = (_as_ints(self.output_splits_tp) if self.output_splits_tp is not None
                      else [out.size(0)] * self.tp_size)
            self._count(splits, out[0:1].numel() * out.element_size(), self.tp_group,
                        "combine/etp_reduce")
            # backward: an all-gather sends this rank's rows to every peer
            self._count_on_backward(out, [out.size(0)] * self.tp_size, self.tp_group,
                                    "combine/etp_reduce")
        return out

    @timed("combine")
    def token_combine(self, hidden_states, *args, **kwargs):
        out = super().token_combine(hidden_states, *args, **kwargs)
        if self.ep_size > 1:
            row_bytes = hidden_states[0:1].numel() * hidden_states.element_size()
            sent = _splits_or_even(self.output_splits, hidden_states.size(0), self.ep_size)
            self._count(sent, row_bytes, self.ep_group, "combine/flat")
            received = _splits_or_even(self.input_splits, out.size(0), self.ep_size)
            self._count_on_backward(out, received, self.ep_group, "combine/flat")
        return out
