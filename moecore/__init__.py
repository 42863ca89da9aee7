"""moecore: Megatron-style Mixture-of-Experts training on PyTorch."""

__version__ = "0.1.0"

from moecore.config import TransformerConfig  # noqa: E402

__all__ = ["TransformerConfig", "__version__"]
