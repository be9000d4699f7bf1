"""Name → dispatcher class, and the MoE layer that builds from it."""

from __future__ import annotations

import copy
import logging

from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoETokenDispatcher,
)

from monta.dispatch.counted_alltoall import CountedAlltoAllTokenDispatcher
from monta.dispatch.monta_dispatcher import DSTPTokenDispatcher, MoNTATokenDispatcher
from monta.dispatch.pipelined import PipelinedMoE
from monta.dispatch.stats import timed
from monta.experts import MoNTAGroupedMLP
from monta.router import MoNTATopKRouter
from monta.training.watchdog import PHASE

logger = logging.getLogger(__name__)

DISPATCHERS: dict[str, type[MoETokenDispatcher]] = {
    # megatron-core's stock all-to-all, unchanged apart from byte counters: the baseline
    "alltoall": CountedAlltoAllTokenDispatcher,
    "allgather": MoEAllGatherTokenDispatcher,
    "monta": MoNTATokenDispatcher,
    # DeepSpeed-MoE style: tokens replicated over TP, every TP rank sends all of them
    "ds_tp": DSTPTokenDispatcher,
}


def register_dispatcher(name: str, cls: type[MoETokenDispatcher]) -> None:
    DISPATCHERS[name] = cls


class MoNTAMoELayer(MoELayer):
    """megatron-core's ``MoELayer`` with the dispatcher taken from :data:`DISPATCHERS`."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        name = config.moe_token_dispatcher_type
        if name not in DISPATCHERS:
            raise ValueError(f"unknown --moe-token-dispatcher-type {name!r}; "
                             f"choose one of {sorted(DISPATCHERS)}")
        pg_collection = pg_collection or get_default_pg_collection()
        # The parent constructor only knows megatron's names: build it with the stock
        # all-to-all, then swap in the registered class.
        stock_config = copy.copy(config)
        stock_config.moe_token_dispatcher_type = "alltoall"
        super().__init__(stock_config, submodules, layer_number, pg_collection)
        self.config = config
        self.token_dispatcher = DISPATCHERS[name](
            self.num_local_experts,
            self.local_expert_indices,
            config=config,
            pg_collection=pg_collection,
        )
        self.token_dispatcher.layer_number = layer_number
        if isinstance(self.token_dispatcher, MoNTATokenDispatcher):
            # MoNTA's grouped experts read rows by their padded ends; others by the counts
            self.token_dispatcher.pad_expert_rows = isinstance(self.experts, MoNTAGroupedMLP)
        if isinstance(self.router, MoNTATopKRouter):
            # routing straight into the expert order (monta/router.py); not under megatron's
            # CUDA graphs, which capture the router and the dispatch as separate pieces
            self.router.emit_expert_order = (
                getattr(self.token_dispatcher, "takes_expert_order", False)
                and getattr(config, "cuda_graph_impl", "none") in (None, "none"))

    def set_layer_number(self, layer_number: int):
        super().set_layer_number(layer_number)
        self.token_dispatcher.layer_number = layer_number

    # Phase markers for the watchdog (monta.training.watchdog): which MoE step of which layer
    # this rank is in when a peer dies. An attribute write each; no sync, no collective.
    def route(self, hidden_states, padding_mask=None):
        PHASE.enter("route", self.layer_number or 0)
        return super().route(hidden_states, padding_mask)

    def preprocess(self, hidden_states, probs, routing_map):
        # the dispatchers exchange split sizes here: the dispatch's first collective
        PHASE.enter("dispatch", self.layer_number or 0)
        return super().preprocess(hidden_states, probs, routing_map)

    def routed_experts_compute(self, hidden_states, probs):
        PHASE.enter("experts", self.layer_number or 0)
        return super().routed_experts_compute(hidden_states, probs)

    def combine(self, output):
        PHASE.enter("combine", self.layer_number or 0)
        return super().combine(output)

    def _enter_backward(self, grad):
        PHASE.enter("moe_backward", self.layer_number or 0)

    def _defers_aux_loss(self, intermediate_tensors) -> bool:
        """Whether this forward computes the router's aux losses after the experts
        (:mod:`monta.router`): only when the whole layer runs here once, i.e. not as a partial
        forward (CUDA-graph pieces) and not under recompute, whose second forward must
        attach the loss inside the checkpointed function itself."""
        return (isinstance(self.router, MoNTATopKRouter) and intermediate_tensors is None
                and not self.moe_layer_recompute
                and getattr(self.config, "cuda_graph_impl", "none") in (None, "none"))

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        if not self._defers_aux_loss(intermediate_tensors):
            return self._forward(hidden_states, intermediate_tensors, padding_mask)
        self.router.defer_aux_loss = True
        try:
            output, bias = self._forward(hidden_states, intermediate_tensors, padding_mask)
        except BaseException:
            self.router.discard_deferred_aux_loss()
            raise
        finally:
            self.router.defer_aux_loss = False
        # the experts' GEMMs are enqueued: the loss's small launches now overlap them
        return self.router.attach_deferred_aux_loss(output), bias

    def _forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        tuner = getattr(self.token_dispatcher, "tuner", None)
        if tuner is None or intermediate_tensors is not None:
            output = super().forward(hidden_states, intermediate_tensors, padding_mask)
        else:
            def run():
                chunks = tuner.setting().chunks
                if chunks == 1:  # megatron's forward, which checkpoints itself when asked
                    return super(MoNTAMoELayer, self).forward(hidden_states, None, padding_mask)
                if self.moe_layer_recompute:  # --recompute-modules moe: rerun in the backward
                    return tensor_parallel.checkpoint(
                        lambda h, m: self._pipelined_forward(h, m, chunks), False,
                        hidden_states, padding_mask)
                return self._pipelined_forward(hidden_states, padding_mask, chunks)

            deciding = tuner.chosen is None
            output = tuner.timed_forward(run, hidden_states.device, inputs=hidden_states)
            if deciding and tuner.chosen is not None:
                logger.info("layer %s monta dispatch tuned: %s", self.layer_number,
                            tuner.report())
        if isinstance(output, tuple) and output[0].requires_grad:
            output[0].register_hook(self._enter_backward)  # the backward pass reaches this layer
        return output

    @timed("dispatch")  # with chunks the experts overlap the transfers: one number for all
    def _pipelined_forward(self, hidden_states, padding_mask, chunks):
        if self.use_shared_expert or self.config.moe_latent_size:
            raise ValueError("--monta-chunks > 1 does not support shared experts or latent MoE")
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE with tensor parallelism needs sequence parallelism")
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        probs, routing_map = self.route(hidden_states, padding_mask)
        dispatcher = self.token_dispatcher
        PHASE.enter("dispatch", self.layer_number or 0)  # chunks overlap dispatch and combine
        x, probs = dispatcher.dispatch_preprocess(hidden_states, routing_map, probs)
        output = PipelinedMoE(dispatcher, self.experts, chunks)(x, probs, dispatcher.routing_map)
        return dispatcher.combine_postprocess(output), None
