"""Silence megatron-core/torch warnings that say nothing actionable on our supported setups."""

from __future__ import annotations

import logging
import warnings

# (message regex, why it is safe to hide)
_KNOWN_WARNINGS = (
    (r".*(Transformer Engine|Apex|apex).*(not installed|Falling back)",
     "optional GPU extras; the README says which features use them"),
    (r"full scope is deprecated", "megatron's own default for cuda_graph_scope"),
    (r".*CUDA_DEVICE_MAX_CONNECTIONS.*", "a CUDA tuning hint; irrelevant on CPU, set by the "
     "examples on GPU"),
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     "megatron-core 0.16.1 calls the older names"),
)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_known_warnings() -> None:
    for pattern, _why in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # MoNTAMoELayer subclasses MoELayer; megatron's layer checks the exact class to decide which
    # kwargs to pass and logs this, though MoNTAMoELayer resolves the same process groups itself.
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
        _DropMessage("Unknown MLP type"))
