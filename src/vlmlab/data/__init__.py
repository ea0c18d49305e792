"""Data: synthetic scenes, LLaVA-JSON conversations, image-text pairs, and the text formats of boxes and points."""
