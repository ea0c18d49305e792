"""`vlmlab serve`: an OpenAI-compatible HTTP server (chat completions with images, embeddings),
with continuous batching, limits on every input, metrics, and a web page."""

from vlmlab.serve.app import create_app
from vlmlab.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
