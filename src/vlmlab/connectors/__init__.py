"""Connectors: how image features become language-model inputs (projectors, pixel shuffle, ...)."""
