"""Errors a user can cause. Each message names the file, field or tensor and what was expected.

The CLI prints `str(error)` and exits non-zero; the server answers 4xx with it. Anything that is
not a `VlmlabError` is a bug in vlmlab.
"""


class VlmlabError(Exception):
    """Base class of every user-caused error."""


class ModelNotFoundError(VlmlabError):
    """A model name or path that resolves to nothing loadable."""


class CheckpointError(VlmlabError):
    """A checkpoint file that is truncated, corrupt, or disagrees with the model's tensors."""


class ConfigError(VlmlabError):
    """A config.json / GGUF metadata field that is missing or has an unsupported value."""


class UnknownArchitectureError(ConfigError):
    """An architecture that vlmlab does not implement."""


class TokenizerError(VlmlabError):
    """A tokenizer file or chat template that cannot be used."""


class InputError(VlmlabError):
    """A request that cannot be served as given (bad argument, malformed messages)."""


class PromptTooLongError(InputError):
    """A prompt (plus the tokens asked for) that does not fit the model's context."""


class DataError(VlmlabError):
    """A dataset record or file that is malformed (bad JSON, missing image, wrong field)."""


class ImageError(InputError):
    """Image bytes that do not decode, or exceed the pixel / byte limits."""


class BusyError(VlmlabError):
    """A server whose queue is full: the request was refused, not queued; try again later."""
