"""Checkpoint tools: ``convert.py`` (Hugging Face Mixtral <-> moecore, TP/PP/EP resharding)."""
