"""Image features written over placeholder tokens: how LLaVA and Idefics3 feed images to a decoder.

The prompt holds one `image_token_id` per image feature (the processor expands each image's
marker into as many placeholders as the image gives features); the network embeds the prompt,
writes the features over the placeholders in order, and runs its decoder on the result. The
counts must agree exactly, or the network raises an `InputError` saying both (transformers'
check). `PlaceholderVLM` is that network minus its vision side: a family subclasses it with
a `language_model` (`LlamaForCausalLM`), a `cfg.image_token_id` and `image_features`.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmlab.errors import InputError
from vlmlab.nn.rope import grid_position_ids, sequence_position_ids
from vlmlab.text.llama import LlamaConfig, LlamaForCausalLM


def fill_placeholders(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int,
                      features: torch.Tensor | None, unit: str = "image") -> torch.Tensor:
    """`embeds` (batch, seq, width) with `features` (n, features each, width) written, in order,
    over the positions where `input_ids` is `token_id`. `unit` names what the n feature groups
    are in the error message (images, image tiles)."""
    placeholders = input_ids == token_id
    n_slots = int(placeholders.sum())
    if features is None:
        if n_slots:
            raise InputError(f"the prompt has {n_slots} image placeholder tokens but no image was given")
        return embeds
    n, each = features.shape[:2]
    if n_slots != n * each:
        raise InputError(
            f"image features and image placeholders disagree: {n} {unit}(s) give {n * each} features "
            f"({each} each) but the prompt has {n_slots} placeholder tokens (id {token_id})"
        )
    return embeds.masked_scatter(placeholders[..., None], features.reshape(-1, features.shape[-1]).to(embeds.dtype))


class PlaceholderVLM(nn.Module):
    """A decoder `language_model` that reads image features in place of `cfg.image_token_id`
    tokens. Subclasses build `self.cfg`, `self.language_model` and define `image_features`."""

    feature_unit = "image"  # what one row of `image_features` is, for error messages
    language_model: LlamaForCausalLM
    rope_grid: tuple[int, int] | None = None  # (rows, columns) of each image's tokens when the decoder uses M-RoPE

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, features per image, LM width)."""
        raise NotImplementedError

    # What generation asks of a decoder (the language model's).
    @property
    def text_cfg(self) -> LlamaConfig:
        return self.cfg.text

    @property
    def context_length(self) -> int:
        return self.language_model.context_length

    def new_cache(self, capacity: int, dtype: torch.dtype | None = None):
        return self.language_model.new_cache(capacity, dtype)

    def tie_weights(self) -> None:
        self.language_model.tie_weights()

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
              decoding: bool = False) -> torch.Tensor:
        """Prompt embeddings with the image features written over the placeholder tokens.
        `decoding`: generated ids after the prompt, where an image token is only a token (as
        transformers treats it), not a placeholder waiting for an image."""
        embeds = self.language_model.model.embed(input_ids)
        if decoding and pixel_values is None:
            return embeds
        features = self.image_features(pixel_values) if pixel_values is not None else None
        return fill_placeholders(embeds, input_ids, self.cfg.image_token_id, features, self.feature_unit)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None, logits_to_keep: int = 0, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab), or as `LlamaForCausalLM.forward` selects them. With a
        cache, later steps pass only new ids and no pixels."""
        decoding = cache is not None and cache.length > 0
        embeds = self.embed(input_ids, pixel_values, decoding=decoding)
        if self.rope_grid is not None and position_ids is None:
            position_ids = self.grid_positions(input_ids, attention_mask, cache, decoding)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, logits_to_keep=logits_to_keep, logits_at=logits_at)

    def grid_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache,
                       decoding: bool) -> torch.Tensor:
        """M-RoPE position ids: (3, batch, seq) for a prompt, its image tokens at (row, column) of
        `rope_grid` (`nn.rope.grid_position_ids`); while decoding, the 1D positions shifted by the
        offsets the prompt left in the cache."""
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if not decoding:
            ids, offsets = grid_position_ids(input_ids == self.cfg.image_token_id, self.rope_grid, padding)
            if cache is not None:
                cache.rope_offsets = offsets
            return ids
        positions = sequence_position_ids(padding, cache.length, *input_ids.shape, input_ids.device)
        if cache.rope_offsets is not None:
            positions = positions + cache.rope_offsets.to(positions.device)[:, None]
        return positions
