"""The text transformer of CLIP and SigLIP: token + learned position embeddings, a pre-LN
encoder, a final LayerNorm, and one vector per text.

CLIP attends causally and pools at the end-of-text token: the first position holding
`eos_token_id`, or, for old configs whose `eos_token_id` is 2 (a wrong value stored before
transformers PR #24773), the position of the highest token id, which is how the original model
found its end-of-text token. SigLIP attends bidirectionally, pools the last position (its
tokenizer pads every text to a fixed length, so that is a pad position) and applies a linear
`head`. Parameter names follow HF's CLIPTextModel / SiglipTextModel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmlab.checkpoints.hf import require_positive
from vlmlab.errors import ConfigError, InputError
from vlmlab.nn.encoder import Encoder, length_groups, padding_mask


@dataclass
class TextEncoderConfig:
    """Field names follow HF's CLIPTextConfig / SiglipTextConfig."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = 49407
    projection_size: int | None = None  # SigLIP's text head width (None: no head)
    # Family switches (not in HF configs).
    causal: bool = True  # CLIP: causal; SigLIP: bidirectional
    pooling: str = "eos"  # "eos" (CLIP) or "last" (SigLIP)

    HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id", "projection_size")

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "max_position_embeddings"), what="text config")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"text hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.pooling not in ("eos", "last"):
            raise ConfigError(f"text pooling {self.pooling!r}: expected 'eos' or 'last'")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **switches: Any) -> "TextEncoderConfig":
        known = {k: hf[k] for k in cls.HF_FIELDS if k in hf}
        return cls(**{**known, **switches})

    def to_hf(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.HF_FIELDS}
        if out["projection_size"] is None:
            del out["projection_size"]
        return out


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[:input_ids.shape[-1]]


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                               cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.projection_size is not None:
            self.head = nn.Linear(cfg.hidden_size, cfg.projection_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states (batch, seq, hidden), pooled (batch, hidden or projection_size))."""
        self._check(input_ids)
        x = self.embeddings(input_ids)
        mask, is_causal = padding_mask(attention_mask, causal=self.cfg.causal)
        x = self.final_layer_norm(self.encoder(x, mask, is_causal))
        pooled = x[torch.arange(x.shape[0], device=x.device), self.pooled_positions(input_ids)]
        return x, self._head(pooled)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(...)[1]` with less work: the last layer computes the pooled position alone, and a
        causal tower runs the batch in groups of similar length, each cut after its latest pooled
        position (under a causal mask nothing after the end-of-text token reaches it)."""
        self._check(input_ids)
        positions = self.pooled_positions(input_ids)
        groups = (length_groups(positions + 1) if self.cfg.causal  # bidirectional: every position reaches it
                  else [(torch.arange(input_ids.shape[0], device=input_ids.device), input_ids.shape[1])])
        parts = [self._pool_rows(input_ids, attention_mask, positions, rows, length) for rows, length in groups]
        return torch.cat(parts)[torch.argsort(torch.cat([rows for rows, _ in groups]))]

    def _pool_rows(self, input_ids, attention_mask, positions, rows, length) -> torch.Tensor:
        ids = input_ids[rows, :length]
        mask, is_causal = padding_mask(None if attention_mask is None else attention_mask[rows, :length],
                                       causal=self.cfg.causal)
        x = self.encoder(self.embeddings(ids), mask, is_causal, keep=positions[rows, None])
        return self._head(self.final_layer_norm(x[:, 0]))

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch,) the position each text is pooled at."""
        if self.cfg.pooling == "last":
            return torch.full(input_ids.shape[:1], input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
        if self.cfg.eos_token_id == 2:  # legacy configs: the end-of-text token has the highest id
            return input_ids.argmax(-1)
        return (input_ids == self.cfg.eos_token_id).int().argmax(-1)

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.cfg.projection_size is None else self.head(pooled)

    def _check(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be (batch, seq), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise InputError(f"text of {input_ids.shape[1]} tokens is longer than the model's "
                             f"{self.cfg.max_position_embeddings} positions")
