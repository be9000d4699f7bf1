"""Name → dispatcher class, and the MoE layer that builds from it."""

from __future__ import annotations

import copy

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
    MoETokenDispatcher,
)

# megatron-core's own dispatchers; the stock ``alltoall`` is our baseline.
DISPATCHERS: dict[str, type[MoETokenDispatcher]] = {
    "alltoall": MoEAlltoAllTokenDispatcher,
    "allgather": MoEAllGatherTokenDispatcher,
}

# Names megatron-core's MoELayer constructs itself.
_STOCK = {"alltoall", "allgather", "flex"}


def register_dispatcher(name: str, cls: type[MoETokenDispatcher]) -> None:
    DISPATCHERS[name] = cls


class MoNTAMoELayer(MoELayer):
    """megatron-core's ``MoELayer`` with the dispatcher taken from :data:`DISPATCHERS`."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        name = config.moe_token_dispatcher_type
        if name not in DISPATCHERS and name not in _STOCK:
            raise ValueError(
                f"unknown --moe-token-dispatcher-type {name!r}; "
                f"choose one of {sorted(set(DISPATCHERS) | _STOCK)}"
            )
        if name in _STOCK:
            super().__init__(config, submodules, layer_number, pg_collection)
            return
        # Build with a stock dispatcher, then swap in ours: the parent's constructor rejects
        # names it does not know.
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
