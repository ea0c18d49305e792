"""vlmlab: vision-language models in pure PyTorch -- library, CLI and server."""

__version__ = "0.1.0"

from vlmlab import errors  # noqa: E402
from vlmlab.api import assemble, load  # noqa: E402

__all__ = ["load", "assemble", "errors", "__version__"]
