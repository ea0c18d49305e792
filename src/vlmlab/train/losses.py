"""Training losses beyond plain cross-entropy: contrastive losses for dual encoders (on one
process or many) and the number token loss for language models that write numbers.

InfoNCE (CLIP): a softmax over the batch in both directions (image -> its text among all texts,
text -> its image), averaged. The temperature is learned as `logit_scale` (logits are
`exp(logit_scale) * cosine`); CLIP clamps it so exp(logit_scale) <= 100 (`clamp_logit_scale`,
applied after each optimiser step).

Sigmoid (SigLIP): every image-text pair is a binary decision, positive on the diagonal,
with a learned scale and bias: loss = -sum_ij log sigmoid(z_ij * (exp(s) x_i.y_j + b)) / n_images.

Distributed (open_clip's options): with `gather=True` each process gathers every process's
features *with gradient* (`torch.distributed.nn.all_gather`), so negatives come from the global
batch; with `local_loss=True` each process scores only its own rows against all columns, which
costs less and, once DDP averages the gradients, gives exactly the gradient of the global loss.

Number token loss (NTL-WAS; Zausinger et al., "Regress, Don't Guess", ICML 2025): cross-entropy
scores a wrong digit the same however far it is from the right one, so a model that answers
"4" for 3 learns as little as one that answers "9". NTL adds, at every labelled position whose
gold token is a digit, the Wasserstein-1 distance between the predicted distribution over the
digit tokens (a softmax over their logits alone) and the true digit: sum_d p(d) |d - y|. Boxes
("(386,509),(473,598)"), points and counts are written digit by digit, so every one of their
digits gets a gradient that points toward the right value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.text.locations import digit_ids

MAX_LOGIT_SCALE = math.log(100.0)


def clamp_logit_scale(logit_scale: torch.Tensor, max_value: float = MAX_LOGIT_SCALE) -> None:
    """CLIP's clamp of the learned temperature, in place: 0 <= logit_scale <= ln(100)."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, max_value)


def _gather(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnn

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dnn.all_gather(x), dim=0)


def _gather_plain(x: torch.Tensor) -> torch.Tensor:
    """all_gather without gradient (for integer ids)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class ContrastiveLoss(nn.Module):
    """kind: "infonce" (CLIP) or "sigmoid" (SigLIP). Features need not be normalised."""

    def __init__(self, kind: str = "infonce", *, gather: bool = True, local_loss: bool = True):
        super().__init__()
        if kind not in ("infonce", "sigmoid"):
            raise ValueError(f"loss kind {kind!r}: expected 'infonce' or 'sigmoid'")
        self.kind, self.gather, self.local_loss = kind, gather, local_loss

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> torch.Tensor:
        """groups: optional (batch,) ids; pairs whose texts share an id are all positives (a batch
        of class prompts repeats texts, and plain InfoNCE would count the repeats as negatives).
        InfoNCE then uses soft targets spread over the positives; the sigmoid loss labels them +1."""
        img = F.normalize(image_features.float(), dim=-1)
        txt = F.normalize(text_features.float(), dim=-1)
        n = img.shape[0]
        if self.gather:
            all_img, all_txt = _gather(img), _gather(txt)
        else:
            all_img, all_txt = img, txt
        if self.local_loss or all_img.shape[0] == n:
            rows_img, rows_txt, offset = img, txt, _rank() * n if all_img.shape[0] != n else 0
        else:
            rows_img, rows_txt, offset = all_img, all_txt, 0
        scale = logit_scale.float().exp()
        logits_img = scale * rows_img @ all_txt.T  # (rows, all)
        targets = torch.arange(rows_img.shape[0], device=img.device) + offset
        positive = None
        if groups is not None:
            all_groups = _gather_plain(groups) if self.gather else groups
            rows_groups = all_groups[targets]
            positive = rows_groups[:, None] == all_groups[None, :]  # (rows, all)
        if self.kind == "infonce":
            logits_txt = scale * rows_txt @ all_img.T
            if positive is None:
                return (F.cross_entropy(logits_img, targets) + F.cross_entropy(logits_txt, targets)) / 2
            soft = positive.float() / positive.sum(-1, keepdim=True)
            return (F.cross_entropy(logits_img, soft) + F.cross_entropy(logits_txt, soft)) / 2
        if logit_bias is not None:
            logits_img = logits_img + logit_bias.float()
        labels = -torch.ones_like(logits_img)
        labels[torch.arange(rows_img.shape[0], device=img.device), targets] = 1.0
        if positive is not None:
            labels[positive] = 1.0
        return -F.logsigmoid(labels * logits_img).sum() / rows_img.shape[0]


class NumberTokenLoss:
    """NTL-WAS (Zausinger et al., ICML 2025) over the tokens that stand for numbers: the digits
    "0".."9" (values 0-9) and, where the tokenizer has them, the location tokens (a coordinate v in
    0-1000 valued v / 100, so that one unit is a tenth of the image, as for a box's first digit).

    At a position whose gold token is one of a group, W1 = sum_t p(t) |value(t) - value(gold)|
    with p the softmax over that group's logits. `weight` scales it against cross-entropy: such a
    position's loss is CE + weight * W1. Call with the logits and gold ids of the labelled
    positions; returns the sum of W1 over the valued positions among them (0 when there are
    none) and how many there were."""

    def __init__(self, tokenizer, weight: float):
        if not weight > 0:
            raise ValueError(f"number token loss weight must be > 0, got {weight}")
        self.weight = weight
        self.groups = [(torch.tensor(digit_ids(tokenizer)), torch.arange(10, dtype=torch.float32))]
        if (bins := getattr(tokenizer, "bins", 0)):  # a LocationTokenizer
            ids = torch.arange(tokenizer.first_id, tokenizer.first_id + bins)
            self.groups.append((ids, torch.tensor([tokenizer.location_value(int(i)) / 100 for i in ids])))

    def __call__(self, logits: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, int]:
        total, count = logits.new_zeros(()).float(), 0
        for ids, values in self.groups:
            ids, values = ids.to(logits.device), values.to(logits.device)
            match = gold[:, None] == ids  # (positions, group size): which token each gold is, if any
            at = match.any(-1)
            if not bool(at.any()):
                continue
            p = logits[at][:, ids].float().softmax(-1)
            value = values[match[at].long().argmax(-1)]
            total = total + (p * (values - value[:, None]).abs()).sum()
            count += int(at.sum())
        return total, count
