"""The checkpoint errors (their own module so every checkpointing module can raise them)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file fails its checksum or does not unpickle: its bytes are damaged (the
    case ``--ckpt-fallback-to-previous`` falls back from)."""
