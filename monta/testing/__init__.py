"""Test and benchmark helpers: a multi-rank launcher and a dense MoE reference.

``monta.testing.distributed`` imports only the standard library at module level (torch inside the
ranks), so importing it is cheap; ``monta.testing.moe_reference`` is pure torch.
"""

from monta.testing.distributed import find_free_port, run_distributed

__all__ = ["find_free_port", "run_distributed"]
