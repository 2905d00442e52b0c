"""Interoperability with other formats: Hugging Face checkpoints (hf.py)."""
