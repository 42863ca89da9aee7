"""Models built from the transformer stack."""

from moecore.models.gpt import GPTModel

__all__ = ["GPTModel"]
