"""`LanguageModel`: a decoder network plus its tokenizer and chat template, ready to generate.

This is what `vlmlab.load` returns for a text-only model and what the CLI and server call.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Sequence

import torch

from vlmlab.checkpoints.hf import write_json, write_safetensors
from vlmlab.errors import InputError
from vlmlab.infer.batching import Batch, Row
from vlmlab.infer.generate import GenerationConfig, GenerationResult
from vlmlab.nn.packed import pack_for_inference, unpack

# End-of-turn markers of common chat templates; generation in chat mode stops on any present.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class LanguageModel:
    """A Llama-family decoder with its tokenizer: `generate`, `stream`, `chat`, `save`."""

    kind = "language-model"

    def __init__(self, net: torch.nn.Module, tokenizer, name: str = "model"):
        self.net = net.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        # Whether the linears are packed; None until `pack` (the first generation) has looked, so
        # a model with nothing to pack (float32) is walked once, not at every generation.
        self.packed: bool | None = None

    def pack(self) -> None:
        """Fuse and pack the network's linears for fast inference (`nn/packed.py`) unless done:
        what generation does first. Until then `net` is an ordinary PyTorch module to inspect or
        train; `unpacked()` gives it back for a while."""
        if self.packed is None:
            self.packed = pack_for_inference(self.net)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @contextmanager
    def unpacked(self) -> Iterator[torch.nn.Module]:
        """The network with ordinary nn.Linear layers (to save, convert or train it), packed again
        after if it was packed before (so an `unpacked` inside another leaves it unpacked)."""
        was_packed = self.packed
        if was_packed:
            unpack(self.net)
            self.net.tie_weights()
        self.packed = False  # and no generation inside packs it
        try:
            yield self.net
        finally:
            self.packed = pack_for_inference(self.net) if was_packed else was_packed

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "LanguageModel":
        with self.unpacked() as net:
            net.to(device=device, dtype=dtype)
        if not self.packed:
            self.packed = None  # the new dtype may pack: the next generation looks again
        return self

    # ---- prompts -------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[dict], *, system: str | None = None, chat: bool = True) -> list[int]:
        """Token ids of a prompt: a string (wrapped in the chat template unless chat=False) or messages."""
        if isinstance(prompt, list):
            messages = prompt
        elif not chat:
            if system is not None:
                raise InputError("--system needs chat mode (a system message is part of the chat template)")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            messages = ([{"role": "system", "content": system}] if system is not None else []) + [
                {"role": "user", "content": prompt}
            ]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stop_token_ids(self, chat: bool) -> list[int]:
        ids: set[int] = set()
        eos = self.net.text_cfg.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if chat:
            ids.update(i for t in END_OF_TURN if (i := self.tokenizer.token_to_id(t)) is not None)
        return sorted(ids)

    # ---- generation ----------------------------------------------------------------------------

    def _config(self, chat: bool, stop: Sequence[str] | None, kwargs: dict) -> GenerationConfig:
        unknown = sorted(set(kwargs) - {f.name for f in fields(GenerationConfig)} - {"stop_strings"})
        if unknown or "stop_strings" in kwargs:
            raise InputError(
                f"unknown generation option(s) {', '.join(unknown or ['stop_strings (pass stop=)'])}; "
                f"expected {', '.join(f.name for f in fields(GenerationConfig) if f.name != 'stop_strings')} or stop"
            )
        stop_ids = kwargs.pop("stop_token_ids", None)
        cfg = GenerationConfig(
            stop_token_ids=self.stop_token_ids(chat) if stop_ids is None else stop_ids,
            stop_strings=tuple(stop or ()),
            **kwargs,
        )
        cfg.validate()
        return cfg

    def generation_config(self, *, chat: bool = True, stop: Sequence[str] | None = None, **kwargs) -> GenerationConfig:
        """The `GenerationConfig` that `generate` would use for these options (validated)."""
        return self._config(chat, stop, kwargs)

    def prepare(self, prompt: str | list[dict], images: Sequence = (), *, system: str | None = None,
                chat: bool = True) -> tuple[list[int], torch.Tensor | None]:
        """Token ids of one prompt (a string, wrapped in the chat template unless chat=False, or
        messages) and the pixel values of its images (a VLM's; None without images): what one
        answer starts from (`infer.batching.Row`)."""
        if images:
            raise InputError(f"{self.name} is a language model; it cannot take images")
        return self.prompt_ids(prompt, system=system, chat=chat), None

    def _prepare(self, prompts: list, *, system, chat, images=None) -> tuple[list[list[int]], dict]:
        """`prepare` for several prompts: their ids, and the first forward's extra inputs (all
        images' pixel values, in order)."""
        rows = [self.prepare(p, images[i] if images else (), system=system, chat=chat) for i, p in enumerate(prompts)]
        pixels = [px for _, px in rows if px is not None]
        return [ids for ids, _ in rows], ({"pixel_values": torch.cat(pixels)} if pixels else {})

    def _run(self, prompts: list, *, system, chat, stop, kwargs,
             images: list[list] | None = None) -> Iterator[tuple[int, str] | list[GenerationResult]]:
        """Yield (row, text delta) as text appears, then the list of results. The prompts are
        prefilled together and decoded as one batch; row i samples with seed + i."""
        start = time.perf_counter()
        cfg = self._config(chat, stop, dict(kwargs))
        deltas: list[tuple[int, str]] = []
        rows = []
        for i, prompt in enumerate(prompts):
            ids, pixels = self.prepare(prompt, images[i] if images else (), system=system, chat=chat)
            rows.append(Row(ids, cfg, pixels, seed_offset=i, created=start,
                            on_event=lambda row, text, done, i=i: text and deltas.append((i, text))))
        for _ in Batch(self).run(rows):
            yield from deltas
            deltas.clear()
        yield from deltas
        yield [row.result() for row in rows]

    def generate(
        self,
        prompt: str | list[dict] | list[str],
        *,
        system: str | None = None,
        chat: bool = True,
        stop: Sequence[str] | None = None,
        **kwargs,
    ) -> GenerationResult | list[GenerationResult]:
        """Answer a prompt (a string, or chat messages), or a batch of prompt strings.

        kwargs are `GenerationConfig` fields: max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, seed, stop_token_ids.
        """
        if isinstance(prompt, list) and not prompt:
            raise InputError("prompt is an empty list; pass a string, chat messages, or a list of strings")
        batch = isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)
        prompts = list(prompt) if batch else [prompt]
        *_, results = self._run(prompts, system=system, chat=chat, stop=stop, kwargs=kwargs)
        return results if batch else results[0]

    def stream(
        self, prompt: str | list[dict], *, system: str | None = None, chat: bool = True, stop=None, **kwargs
    ) -> Iterator[str]:
        """Text deltas of one answer as they are generated. The result's stats are on `.last_result`."""
        for event in self._run([prompt], system=system, chat=chat, stop=stop, kwargs=kwargs):
            if isinstance(event, list):
                self.last_result = event[0]
            else:
                yield event[1]

    def chat(self, messages: list[dict], **kwargs) -> GenerationResult:
        """Continue a conversation given as [{"role": ..., "content": ...}, ...]."""
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InputError('messages must be a non-empty list of {"role": ..., "content": ...} objects')
        return self.generate(messages, **kwargs)

    # ---- saving --------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write a Hugging Face folder (config.json, model.safetensors, tokenizer files)."""
        folder = Path(folder)
        cfg = self.net.cfg.to_hf()
        cfg["dtype"] = str(self.dtype).removeprefix("torch.")
        with self.unpacked() as net:
            write_safetensors(folder / "model.safetensors", net.hf_state_dict())
        write_json(folder / "config.json", cfg)
        text = self.net.text_cfg.to_hf()
        gen = {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if text.get(k) is not None}
        write_json(folder / "generation_config.json", gen)
        self.tokenizer.save(folder)
