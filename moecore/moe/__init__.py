"""Mixture-of-Experts: router, dispatchers, experts and the MoE layer."""

from moecore.moe.layer import MoELayer

__all__ = ["MoELayer"]
