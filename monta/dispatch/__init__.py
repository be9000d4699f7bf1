"""Token dispatchers, selected by ``--moe-token-dispatcher-type``.

megatron-core's ``MoELayer`` hard-codes its dispatcher choice; :class:`MoNTAMoELayer` looks the
name up in :data:`DISPATCHERS` instead, so new backends plug in with one line here and the
stock ones stay usable unchanged.
"""

from monta.dispatch.registry import DISPATCHERS, MoNTAMoELayer, register_dispatcher

__all__ = ["DISPATCHERS", "MoNTAMoELayer", "register_dispatcher"]
