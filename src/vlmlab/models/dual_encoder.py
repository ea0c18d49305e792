"""What CLIP, SigLIP and our LiT-style models share: two towers, one embedding space, a learned
temperature (and SigLIP's bias), and the similarity logits between normalised embeddings.

A family subclasses `DualEncoderNet`, builds its towers in `__init__` and says how each tower
turns inputs into one vector (`encode_image`, `encode_text`); everything else is here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DualEncoderNet(nn.Module):
    # How classification turns logits into probabilities: CLIP's softmax over labels, SigLIP's
    # independent sigmoids.
    probability = "softmax"

    def encode_image(self, pixel_values: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, embed_dim) image embeddings, not normalised; patches: (batch, k) indices of the
        only patch tokens the image tower sees (training with FLIP's masking; see `vision.vit`)."""
        raise NotImplementedError

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, embed_dim) text embeddings, not normalised."""
        raise NotImplementedError

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """logits_per_image (images, texts): scale * cosine similarity (+ bias)."""
        img = F.normalize(image_embeds, dim=-1)
        txt = F.normalize(text_embeds, dim=-1)
        out = (txt @ img.T * self.logit_scale.exp()).T
        bias = getattr(self, "logit_bias", None)  # SigLIP's learned bias; CLIP has none
        return out if bias is None else out + bias

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, *, features: bool = False,
                patches: torch.Tensor | None = None):
        """logits_per_image, or with features=True the two embeddings (what a training loss needs;
        training calls forward, not encode_*, so that DDP sees the call). patches: see encode_image."""
        img, txt = self.encode_image(pixel_values, patches), self.encode_text(input_ids, attention_mask)
        return (img, txt) if features else self.logits(img, txt)
