"""MoNTA: network-traffic-aware Mixture-of-Experts training on megatron-core."""

__version__ = "0.1.0"
