"""megatron-core's ``TopKRouter`` with its load-balancing losses computed off the critical path.

In megatron's router the aux-loss terms (a second softmax and top-k over the logits, the
token counts, the loss arithmetic: ~15 small launches) are computed inside ``routing()`` and
attached to the routing probabilities, so they sit between the gating GEMM and the dispatch.
Nothing downstream needs them in the forward: ``MoEAuxLossAutoScaler`` is the identity there
and only adds the loss's gradient in the backward. On one H200 each launch costs the host
~40 µs while the GPU waits (the layer's first expert GEMM cannot start before the dispatch),
about 0.9 ms per layer at Mixtral shapes. :class:`MoNTATopKRouter` therefore lets the layer
defer them: ``routing()`` returns the same probabilities and map without the loss, and
:meth:`MoNTATopKRouter.attach_deferred_aux_loss` runs megatron's own loss methods once the
experts are enqueued, attaching the loss to the layer's output instead of the probabilities.

Same losses, same logged values, same gradients: the loss's gradient reaches the logits
through the same softmax, as one more summand of their gradient (a sum of two terms, in
either order the same bits).

On the one-rank dispatch path the router also skips megatron's dense [tokens, experts]
probabilities and map: with :attr:`MoNTATopKRouter.emit_expert_order` set (by the layer, when
its dispatcher takes it) and plain softmax top-k routing, ``routing()`` returns the
probabilities already in expert order and the :class:`~monta.dispatch.plan.ExpertOrder` in
place of the map (:mod:`monta.dispatch.routed_order`: two launches on a GPU instead of ~15).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter


class MoNTATopKRouter(TopKRouter):
    """``TopKRouter`` whose aux losses can be computed after the experts (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.defer_aux_loss = False
        """Set by the layer around a forward that calls :meth:`attach_deferred_aux_loss`."""
        self._skipping_aux = False
        self._aux_logits = None
        self._pending = None
        self.emit_expert_order = False
        """Set by the layer when its dispatcher takes an ExpertOrder for the routing map."""

    def routes_in_expert_order(self) -> bool:
        """Whether ``routing()`` returns (probabilities in expert order, ExpertOrder): asked
        for, and routing that :func:`~monta.dispatch.routed_order.route_in_expert_order`
        computes (plain softmax top-k: no groups, scaling, expert bias, replay, TE fusion or
        token dropping; anything else goes through megatron's routing)."""
        c = self.config
        return (self.emit_expert_order and self.routing_type != "sinkhorn"
                and self.score_function == "softmax" and not c.moe_router_pre_softmax
                and not c.moe_router_group_topk and not c.moe_router_topk_scaling_factor
                and self.expert_bias is None and self.router_replay is None
                and not c.moe_router_fusion and c.moe_expert_capacity_factor is None)

    def is_aux_loss_enabled(self) -> bool:
        return not getattr(self, "_skipping_aux", False) and super().is_aux_loss_enabled()

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if self.routes_in_expert_order():
            return self._routing_in_expert_order(logits, padding_mask)
        deferring = (self.defer_aux_loss and self.training and torch.is_grad_enabled()
                     and super().is_aux_loss_enabled())
        if not deferring:
            return super().routing(logits, padding_mask)
        self._skipping_aux = True
        try:
            probs, routing_map = super().routing(logits, padding_mask)
        finally:
            self._skipping_aux = False
        self._pending = (self._aux_logits, logits.shape[:2], padding_mask)
        self._aux_logits = None
        return probs, routing_map

    def _routing_in_expert_order(self, logits, padding_mask):
        """megatron's ``routing()`` for plain softmax top-k, its output in expert order."""
        from monta.dispatch.routed_order import route_in_expert_order  # (import cycle)

        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        flat_mask = padding_mask.reshape(-1) if padding_mask is not None else None
        logits = self.apply_z_loss(logits, padding_mask=flat_mask)
        probs, order = route_in_expert_order(logits, self.topk)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            pending = (logits, (seq_length, bsz), padding_mask)
            if self.defer_aux_loss:
                self._pending = pending
            else:
                probs = self._attach_aux_loss(probs, *pending)
        return probs, order

    def apply_z_loss(self, logits, padding_mask=None):
        logits = super().apply_z_loss(logits, padding_mask=padding_mask)
        if getattr(self, "_skipping_aux", False):
            # megatron computes the aux losses from these (the z-loss carrier), so the loss
            # gradients meet in the same node and add up in the same order
            self._aux_logits = logits
        return logits

    def attach_deferred_aux_loss(self, carrier: torch.Tensor) -> torch.Tensor:
        """The aux losses megatron's ``routing()`` would have attached, on ``carrier`` (any
        tensor of the layer's forward graph; the layer passes its output). A no-op when the
        last ``routing()`` computed them itself."""
        if self._pending is None:
            return carrier
        pending, self._pending = self._pending, None
        return self._attach_aux_loss(carrier, *pending)

    def _attach_aux_loss(self, carrier, logits, shape, padding_mask):
        """megatron's aux losses of ``logits`` [tokens, experts], attached to ``carrier``."""
        seq_length, bsz = shape
        # as in the aux-loss block of TopKRouter.routing (megatron-core 0.16)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        masked = padding_mask is not None
        routing_map, scores = compute_routing_scores_for_aux_loss(
            logits, self.topk, self.score_function, fused=self.config.moe_router_fusion,
            padding_mask=padding_mask)
        carrier = self._apply_aux_loss(carrier, scores, routing_map, with_padding_mask=masked)
        carrier = self._apply_seq_aux_loss(carrier, scores, routing_map, seq_length, bsz,
                                           with_padding_mask=masked)
        return self._apply_global_aux_loss(carrier, scores, routing_map, with_padding_mask=masked)

    def discard_deferred_aux_loss(self) -> None:
        self._pending = None
