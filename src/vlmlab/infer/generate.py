"""What generation is made of, for any decoder with vlmlab's `forward(ids, attention_mask=,
cache=, logits_to_keep=)`: the options (`GenerationConfig`), picking the next token (greedy,
temperature, top-k, top-p, repetition penalty), `TextStream`, which turns a row's tokens into
text deltas and watches for stop strings, and the answer (`GenerationResult`).

The loop that runs them, for one prompt, a batch, or requests that come and go, is
`infer.batching.Batch`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Sequence

import torch

from vlmlab.errors import InputError


@dataclass
class GenerationResult:
    """One prompt's answer. `token_ids` are the new tokens (without the stop token).

    tokens_per_s is the decode rate after the first token: (n - 1) / (t_last - t_first).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (stop token or string) or "length"
    time_to_first_token_s: float
    tokens_per_s: float
    # A VLM's answer: boxes (x0, y0, x1, y1) and points (x, y) it wrote, in the pixels of the
    # original image they refer to (None for text-only generation).
    boxes: list[tuple[float, float, float, float]] | None = None
    points: list[tuple[float, float]] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None or k not in ("boxes", "points")}


@dataclass
class GenerationConfig:
    """How to pick new tokens. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = field(default_factory=tuple)

    def validate(self) -> None:
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if any(not s for s in self.stop_strings):
            raise InputError("stop strings must be non-empty")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the sequence: divide positive logits, multiply negative."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and outside the smallest nucleus of mass top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Next token ids (batch,) from last-position logits (batch, vocab)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = logits.softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def cache_dtype(model) -> torch.dtype:
    """KV-cache dtype: float32 for half-precision models on CPU, else the model's dtype.

    PyTorch's CPU attention kernels are several times slower in bfloat16 than in float32 at
    decode shapes (measured: 98 vs 22 us per layer for one query over 100 keys), and the cache of
    a small model is small, so attention runs in float32 there.
    """
    param = next(model.parameters())
    if param.device.type == "cpu" and param.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return param.dtype


class TextStream:
    """Incremental detokenisation of one row: text deltas that are safe to show, and stop strings.

    A delta is held back while the text ends in an incomplete UTF-8 sequence or in a prefix of a
    stop string, so what was shown never has to be taken back.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the new text that can be shown (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        hits = [at for s in self.stop_strings if (at := text.find(s, max(0, self.emitted - len(s)))) != -1]
        if hits:
            self.stopped = True
            text = text[: min(hits)]
        self.text = text
        safe = len(text) if self.stopped else len(text) - self._held(text)
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        """Whatever was held back, once the row has finished (an incomplete trailing character
        comes out as the tokenizer decodes it, U+FFFD, as the reference decoder gives it)."""
        if not self.stopped and self.ids:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta

    def _held(self, text: str) -> int:
        held = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if s.startswith(text[-k:]):
                    held = k
                    break
        return held
