"""Token generation for any decoder with vlmlab's `forward(ids, attention_mask=, cache=, logits_to_keep=)`.

`generate_tokens` runs the loop: left-padded batched prefill, then one token per step through the
KV cache, with greedy / temperature / top-k / top-p sampling and a repetition penalty. Sampling
uses one seeded generator per row, so a row samples the same tokens alone or in a batch.
`TextStream` turns a row's tokens into text deltas and watches for stop strings.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from vlmlab.errors import InputError, PromptTooLongError


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


@torch.inference_mode()
def generate_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    pad_id: int = 0,
    done: list[bool] | None = None,
    prefill: dict | None = None,
) -> Iterator[list[int | None]]:
    """Yield, step by step, the new token of every prompt (None for rows that have finished).

    A row finishes after yielding one of `cfg.stop_token_ids`, or when the caller sets
    `done[row] = True` (stop strings are detected on text, by the caller). The loop ends when every
    row is done or `max_new_tokens` were produced (fewer if the context would overflow).
    `prefill`: extra inputs of the first forward only (a VLM's `pixel_values`).
    """
    cfg.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt must have at least one token")
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    context = model.context_length
    if longest >= context:
        raise PromptTooLongError(
            f"prompt has {longest} tokens but the model's context is {context} tokens; shorten the prompt"
        )
    steps = min(cfg.max_new_tokens, context - longest)
    done = done if done is not None else [False] * batch
    device = next(model.parameters()).device
    ids = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, longest), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, longest - len(p):] = True
    padded = not bool(mask.all())
    generators = [None] * batch
    if cfg.temperature > 0:
        base = cfg.seed if cfg.seed is not None else int(torch.seed() % 2**62)
        generators = [torch.Generator(device=device).manual_seed(base + i) for i in range(batch)]
    stop_ids = set(cfg.stop_token_ids)
    cache = model.new_cache(longest + steps, dtype=cache_dtype(model))
    logits = model(ids, attention_mask=mask if padded else None, cache=cache, logits_to_keep=1, **(prefill or {}))[:, -1]
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros((batch, logits.shape[-1]), dtype=torch.bool, device=device)
        # Pad positions point at the row's last (always real) token, so no index is written twice
        # with different values (scatter's order for duplicates is undefined).
        seen.scatter_(1, ids.where(mask, ids[:, -1:]), True)
    for step in range(steps):
        next_ids = sample(logits, cfg, seen, generators)
        tokens = next_ids.tolist()
        out: list[int | None] = []
        for i, tok in enumerate(tokens):
            if done[i]:
                out.append(None)
                continue
            out.append(tok)
            if tok in stop_ids:
                done[i] = True
        yield out
        if all(done) or step == steps - 1:
            return
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        if padded:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        logits = model(next_ids[:, None], attention_mask=mask if padded else None, cache=cache)[:, -1]


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
