"""What an operator sets for `vlmlab serve`: batching, limits on requests, and the image intake policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmlab.serve.media import MediaPolicy


@dataclass
class ServeConfig:
    """Server settings. Every limit is enforced with a 4xx answer whose message names the limit."""

    max_batch: int = 8  # rows decoded together per generative model (1 = no batching)
    max_queue: int = 32  # requests waiting for a row; more are refused with 429 + Retry-After
    max_body_bytes: int = 32 * 1024 * 1024  # request body
    max_images: int = 4  # images per request
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_n: int = 4  # choices per request
    max_inputs: int = 256  # texts/images per embeddings request
    request_timeout_s: float = 120.0  # queueing + generation; then 408 (or an error event in a stream)
    media: MediaPolicy = field(default_factory=MediaPolicy)
