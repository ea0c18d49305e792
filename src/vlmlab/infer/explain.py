"""Seeing inside: where in the image a VLM looked while it answered (`vlmlab explain`).

The answer is generated as usual; then prompt + answer run once more with the language model's
attention probabilities recorded (`nn.attention.record_attention`). For every layer and head,
the attention that the positions predicting the answer's tokens pay to the image features is
renormalised over the image (so text tokens and the attention sink at the start of the prompt do
not dilute it), then averaged over answer tokens, heads and layers: one weight per image feature.
For a LLaVA-style model the features are the vision tower's patches, so the weights form the
patch grid; upsampled to the region of the original image the model saw (`ImageProcessor.view`)
they are drawn over it as a heat map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmlab.errors import InputError
from vlmlab.infer.lm import GenerationResult
from vlmlab.infer.vlm import VisionLanguageModel, with_image_markers
from vlmlab.nn.attention import record_attention
from vlmlab.vision.preprocess import load_image


@dataclass
class Explanation:
    result: GenerationResult  # the answer
    heat: np.ndarray  # (rows, cols) attention per image feature (patch or pixel-shuffled block), sums to 1
    image: Image.Image  # the original image
    view: tuple[float, float, float, float]  # the region of `image` the model saw

    def overlay(self, alpha: float = 0.6) -> Image.Image:
        """The image with the heat map drawn over the region the model saw (red = most attended)."""
        left, top, right, bottom = self.view
        size = (max(1, round(right - left)), max(1, round(bottom - top)))
        heat = self.heat / max(float(self.heat.max()), 1e-12)
        grey = Image.fromarray(np.uint8(np.round(heat * 255)), mode="L").resize(size, Image.Resampling.BICUBIC)
        h = np.asarray(grey, dtype=np.float32) / 255.0
        colour = np.stack([np.clip(2 * h, 0, 1), np.clip(2 * h - 1, 0, 1), np.zeros_like(h)], -1)  # black-red-yellow
        layer = Image.fromarray(np.uint8(np.round(np.concatenate([colour, (alpha * h)[..., None]], -1) * 255)), "RGBA")
        canvas = self.image.convert("RGBA")
        x, y = round(left), round(top)  # negative where the crop padded the image: clip to the canvas
        layer = layer.crop((max(0, -x), max(0, -y), min(layer.width, canvas.width - x), min(layer.height, canvas.height - y)))
        canvas.alpha_composite(layer, (max(0, x), max(0, y)))
        return canvas.convert("RGB")


def explain(model: VisionLanguageModel, question: str, image: Any, **generation: Any) -> Explanation:
    """Answer `question` about one image and compute the answer's attention over its patches."""
    net = model.net
    if not hasattr(net, "language_model") or not hasattr(net.cfg, "vision_feature_select_strategy"):
        raise InputError(f"explain supports LLaVA-style models (patch features in the prompt); {model.name} is not one")
    image = image if isinstance(image, Image.Image) else load_image(image)
    result = model.ask(question, [image], **generation)
    ids, extra = model._prepare([with_image_markers(question, 1)], system=generation.get("system"), chat=True, images=[[image]])
    prompt_ids = ids[0]
    full = prompt_ids + result.token_ids
    if not result.token_ids:
        raise InputError("the model answered with no tokens; there is nothing to explain")
    slots = [i for i, t in enumerate(full) if t == model.image_token_id]
    queries = list(range(len(prompt_ids) - 1, len(full) - 1))  # the positions that predicted each answer token
    with torch.inference_mode(), record_attention(net.language_model.modules()) as layers:
        net(torch.tensor([full]), extra["pixel_values"])
    weights = []
    for layer in layers:
        probs = layer[0][0][:, queries][:, :, slots]  # (heads, answer tokens, image features)
        weights.append((probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)).mean((0, 1)))
    heat = torch.stack(weights).mean(0)
    rows, cols = (s // net.cfg.patch_size_in_features for s in extra["pixel_values"].shape[-2:])
    if heat.numel() == rows * cols + 1:  # the [class] token kept ("full" strategy): not a place
        heat = heat[1:]
    if heat.numel() != rows * cols:
        raise InputError(f"{model.name}: {heat.numel()} image features do not form the {rows}x{cols} patch grid")
    heat = heat.reshape(rows, cols).numpy()
    return Explanation(result, heat / heat.sum(), image, model.processor.view(image.width, image.height))


def explain_to_file(model: VisionLanguageModel, question: str, image: Any, out: str | Path,
                    **generation: Any) -> Explanation:
    """`explain` and write the overlay PNG to `out`."""
    explanation = explain(model, question, image, **generation)
    explanation.overlay().save(out)
    return explanation
