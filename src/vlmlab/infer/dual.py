"""`DualEncoder`: a CLIP-style model with its tokenizer and image processor, behind the small API
the CLI, server and evaluation harness use: `embed_image`, `embed_text`, `similarity`, `classify`.

Embeddings are returned L2-normalised (as the model's own similarity uses them). Zero-shot
classification embeds each label in every prompt template, averages the normalised embeddings
per label and normalises again (CLIP's template ensembling), then turns the logits into
probabilities the way the family was trained: softmax over labels (CLIP) or an independent
sigmoid per label (SigLIP).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlmlab.errors import InputError
from vlmlab.models.dual_encoder import DualEncoderNet
from vlmlab.text.tokenizer import pad_batch
from vlmlab.vision.preprocess import ImageProcessor

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class TextInputs:
    """How a family turns texts into (input_ids, attention_mask): tokenizer, special tokens,
    truncation, and padding. CLIP pads to the longest text and masks the padding; SigLIP pads to
    its fixed length and attends to the padding (it was trained so, and pools the last position),
    so its mask is None."""

    tokenizer: Any
    max_length: int
    pad_to_max_length: bool = False
    attention_mask: bool = True

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(texts, str) or not texts:
            raise InputError("texts must be a non-empty list of strings")
        ids = self.tokenizer.encode_batch(list(texts), add_special_tokens=True, max_length=self.max_length)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids, mask = pad_batch(ids, pad, self.max_length if self.pad_to_max_length else None)
        return input_ids, (mask if self.attention_mask else None)


class DualEncoder:
    kind = "dual-encoder"

    def __init__(self, net: DualEncoderNet, text_inputs: TextInputs, processor: ImageProcessor,
                 name: str = "model", source: Path | None = None, batch_size: int = 64):
        self.net = net.eval().requires_grad_(False)
        self.text_inputs = text_inputs
        self.processor = processor
        self.name = name
        self.source = source
        self.batch_size = batch_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @torch.inference_mode()
    def embed_image(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings of images (PIL images, paths or bytes)."""
        if not isinstance(images, (list, tuple)) or not images:
            raise InputError("images must be a non-empty list")
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images[start:start + self.batch_size]).to(self.dtype)
            out.append(self.net.encode_image(pixels).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings of texts."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise InputError("texts must be a non-empty list of strings")
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask = self.text_inputs(texts[start:start + self.batch_size])
            out.append(self.net.encode_text(ids, mask).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.inference_mode()
    def similarity(self, images: Sequence[Any], texts: Sequence[str]) -> torch.Tensor:
        """(images, texts) logits: the model's scale x cosine similarity (+ SigLIP's bias)."""
        return self._logits(self.embed_image(images), self.embed_text(texts))

    def _logits(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.net.logits(img.to(self.dtype), txt.to(self.dtype)).float()

    @torch.inference_mode()
    def classify(self, images: Sequence[Any], labels: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """(images, labels) probabilities of each label, zero-shot, with template ensembling."""
        if isinstance(labels, str) or not labels or len(set(labels)) != len(labels):
            raise InputError("labels must be a non-empty list of distinct strings")
        if isinstance(templates, str) or not templates or any("{}" not in t for t in templates):
            raise InputError("templates must be a non-empty list of strings, each with a '{}' for the label")
        prompts = [t.format(label) for label in labels for t in templates]
        txt = self.embed_text(prompts).reshape(len(labels), len(templates), -1).mean(1)
        logits = self._logits(self.embed_image(images), F.normalize(txt, dim=-1))
        return logits.sigmoid() if self.net.probability == "sigmoid" else logits.softmax(-1)

    def save(self, folder: str | Path) -> None:
        """Write a Hugging Face folder: config.json, model.safetensors, preprocessor_config.json
        and the tokenizer files."""
        from vlmlab.checkpoints.hf import write_json, write_safetensors

        folder = Path(folder)
        write_safetensors(folder / "model.safetensors", self.net.hf_state_dict())
        write_json(folder / "config.json", {**self.net.cfg.to_hf(), "dtype": str(self.dtype).removeprefix("torch.")})
        self.processor.to_folder(folder)
        if not hasattr(self.net, "text_tokenizer"):  # a locked tower's tokenizer stays with the tower
            self.text_inputs.tokenizer.save(folder)
