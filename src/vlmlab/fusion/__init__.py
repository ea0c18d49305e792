"""Fusion: how image features enter the language model (placeholder tokens, cross-attention, ...)."""
