"""Mixture-of-Experts: router, dispatchers, experts and the MoE layer."""

__all__ = ["MoELayer"]


def __getattr__(name):
    # Lazy, so `import moecore.moe.router` does not pull in the whole layer.
    if name == "MoELayer":
        from moecore.moe.layer import MoELayer

        return MoELayer
    raise AttributeError(name)
