"""Supervised pre-training of a dual encoder's image tower on the scenes' object attributes
(`vlmlab train attributes`): a warm start for contrastive training.

Contrastive training from scratch on the scenes learns colour in a few hundred steps but not
shape: the contrastive signal for shape is weak while the tower cannot yet tell shapes apart,
and on this CPU it ran out of budget first (scenes-clip v0: zero-shot shape 0.28, chance 0.17).
A direct signal helps: one linear head per attribute (shape, colour, size) on the tower's pooled
embedding, cross-entropy on single-object scenes. Two things make it affordable here:

- FLIP-style masking around the object: each image is seen through `patches` of its patches,
  all of those the object's box touches plus random others (`object_patches`), so a step costs
  about patches / 196 of a full one while the object is always in view; the last
  `unmask_steps` show every patch, so the tower also meets the token set inference gives it
  (FLIP's unmasked tuning: judged by size, a tower trained on 40 patches alone reads the
  full set differently);
- fresh scenes every step (sample i of the run is `classification_sample(i)`), no repetition.

Shape then starts to be learnt after some 50k images and keeps improving with more. The result
is the whole dual encoder again (`out/model`, the image tower trained, everything else as it
came), which `vlmlab train clip --init out/model` aligns with the text tower (`--attributes W`
keeps an attribute loss while it does, so that shape is not unlearnt); the heads stay in the
run's checkpoint. Evaluation: `evaluate_attributes` (accuracy per attribute on held-out
scenes with every patch in view, as inference sees them), run at the end into
`out/attributes_eval.json`.

Dense mode (`dense_layer`, `vlmlab train attributes --dense LAYER`) teaches the patch tokens
instead, for a tower whose patches a generative VLM reads: on multi-object scenes every patch
token of that layer classifies the object under the patch's centre (shape, or "background";
colour and size of that object), the heads shared by all patches. A tower trained on pooled
attributes alone names one object's shape from [class] (0.96) but its penultimate patch tokens
tell shapes apart poorly (a linear probe at the object's 32-px cell: 0.43; colour 0.87), and a
VLM cannot answer "what colour is the star?" before it can find the star.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.checkpoints.hf import atomic_write
from vlmlab.data.scenes import COLOR_NAMES, SHAPES, SIZES, SceneConfig, classification_sample, generate_sample
from vlmlab.data.scenes.scene import derive_seed
from vlmlab.errors import ConfigError
from vlmlab.infer.dual import DualEncoder
from vlmlab.train.trainer import TrainConfig, Trainer
from vlmlab.vision.vit import VisionTransformer

ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLOR_NAMES, "size": SIZES}
EVAL_FILE = "attributes_eval.json"


def attribute_heads(dim: int) -> nn.ModuleDict:
    """One linear classifier per attribute (ATTRIBUTES order) on a `dim`-wide embedding."""
    return nn.ModuleDict({name: nn.Linear(dim, len(values)) for name, values in ATTRIBUTES.items()})


def scene_labels(obj, *, size_visible: bool = True) -> tuple[int, int, int]:
    """An object's (shape, colour, size) label indices into ATTRIBUTES; size -1 when not visible."""
    return (ATTRIBUTES["shape"].index(obj.shape), ATTRIBUTES["color"].index(obj.color),
            ATTRIBUTES["size"].index(obj.size) if size_visible else -1)


BACKGROUND = len(SHAPES)  # dense shape label of a patch no object covers


def patch_labels(objects, grid: int, patch: int) -> torch.Tensor:
    """(grid * grid, 3) dense labels, row-major patches: (shape, colour, size) of the object whose
    box holds the patch's centre (the last drawn, i.e. the visible one, where boxes overlap);
    (BACKGROUND, -1, -1) where none does."""
    labels = torch.tensor([[BACKGROUND, -1, -1]] * (grid * grid))
    centres = torch.arange(grid) * patch + patch / 2
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        cols = ((centres >= x0) & (centres < x1)).nonzero().flatten()
        rows = ((centres >= y0) & (centres < y1)).nonzero().flatten()
        idx = (rows[:, None] * grid + cols[None, :]).flatten()
        labels[idx] = torch.tensor(scene_labels(obj))
    return labels


class DenseAttributeHeads(nn.Module):
    """An image tower with per-patch attribute classifiers on one layer's patch tokens."""

    def __init__(self, tower: VisionTransformer, layer: int):
        super().__init__()
        n = tower.cfg.num_hidden_layers
        if not -n <= layer <= n or layer == 0:
            raise ConfigError(f"dense layer {layer}: expected 1..{n} or -{n}..-1 (HF indexing, -1 = last)")
        self.tower, self.layer = tower, layer
        self.heads = nn.ModuleDict({"shape": nn.Linear(tower.cfg.hidden_size, len(SHAPES) + 1),
                                    "color": nn.Linear(tower.cfg.hidden_size, len(COLOR_NAMES)),
                                    "size": nn.Linear(tower.cfg.hidden_size, len(SIZES))})

    def forward(self, pixel_values: torch.Tensor, patches: None = None) -> dict[str, torch.Tensor]:
        tokens = self.tower.feature_layer(pixel_values, self.layer)[:, int(self.tower.cfg.class_token):]
        return {name: head(tokens).flatten(0, 1) for name, head in self.heads.items()}


class AttributeHeads(nn.Module):
    """An image tower with one linear classifier per attribute on its pooled embedding."""

    def __init__(self, tower: VisionTransformer):
        super().__init__()
        if tower.cfg.pooling not in ("cls", "mean", "map"):
            raise ConfigError(f"the image tower pools {tower.cfg.pooling!r}; attribute heads need a pooled embedding")
        self.tower = tower
        self.heads = attribute_heads(tower.cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patches: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pooled = self.tower.pool(pixel_values, patches)
        return {name: head(pooled) for name, head in self.heads.items()}


@dataclass
class AttributeRecipe:
    """What `vlmlab train attributes` needs besides the generic TrainConfig."""

    patches: int = 40  # patches per image the tower trains on (object first, then random); 0 = all
    unmask_steps: int = 0  # the run's last steps see every patch (FLIP's unmasked tuning)
    scene_size: int = 224  # must equal the tower's image size (object boxes map onto the patch grid)
    eval_n: int = 500  # held-out test scenes scored at the end (0: none)
    dense_layer: int | None = None  # per-patch heads on this layer's patch tokens, multi-object scenes


def object_patches(box: tuple[int, int, int, int], grid: int, patch: int, keep: int, seed: int) -> torch.Tensor:
    """(keep,) sorted indices into the grid x grid patches (row-major) of an image whose object has
    pixel box (x0, y0, x1, y1), exclusive ends: every patch the box touches, then random others
    up to `keep`; if the box touches more than `keep`, a random `keep` of them."""
    n = grid * grid
    if not 1 <= keep <= n:
        raise ConfigError(f"patches per image = {keep}: expected 1..{n} (0 keeps every patch)")
    x0, y0, x1, y1 = box
    c0, c1 = max(0, x0 // patch), min(grid - 1, max(x0, x1 - 1) // patch)
    r0, r1 = max(0, y0 // patch), min(grid - 1, max(y0, y1 - 1) // patch)
    inside = [r * grid + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
    rng = random.Random(seed)
    if len(inside) >= keep:
        chosen = rng.sample(inside, keep)
    else:
        taken = set(inside)
        chosen = inside + rng.sample([i for i in range(n) if i not in taken], keep - len(inside))
    return torch.tensor(sorted(chosen), dtype=torch.long)


def labelled_scene(index: int, split: str, config: SceneConfig):
    """(image, (shape, colour, size) label indices, object box) of single-object scene `index`."""
    sample = classification_sample(index, split, config)
    obj = sample.scenes[0].objects[0]
    return sample.images[0], scene_labels(obj), obj.box


def dense_scene(index: int, split: str, config: SceneConfig, grid: int, patch: int):
    """(image, (grid * grid, 3) patch labels) of multi-object scene `index` of `split`."""
    sample = generate_sample("caption_short", index, split, config)
    return sample.images[0], patch_labels(sample.scenes[0].objects, grid, patch)


def batch_fn(model: DualEncoder, recipe: AttributeRecipe, batch_size: int, seed: int = 0, steps: int | None = None):
    """data(step, micro, rank, world, size): (pixels, labels (size, 3), patches or None) of this
    rank's slice of the global batch of `step`; sample i of the run is training scene i. In a run
    of `steps` steps, the last `recipe.unmask_steps` keep every patch (patches None)."""
    vit = model.net.vision_model.cfg
    unmasked_from = steps - recipe.unmask_steps if steps is not None and recipe.unmask_steps else None
    config = SceneConfig(width=recipe.scene_size, height=recipe.scene_size)

    def data(step: int, micro: int, rank: int, world: int, size: int):
        start = step * batch_size + (micro * world + rank) * size
        if recipe.dense_layer is not None:
            images, labels = zip(*(dense_scene(i, "train", config, vit.grid, vit.patch_size)
                                   for i in range(start, start + size)))
            return model.processor(list(images)), torch.cat(labels), None
        images, labels, boxes = zip(*(labelled_scene(i, "train", config) for i in range(start, start + size)))
        patches = None
        if recipe.patches and (unmasked_from is None or step < unmasked_from):
            patches = torch.stack([object_patches(box, vit.grid, vit.patch_size, recipe.patches,
                                                  derive_seed("attribute-patches", seed, i))
                                   for i, box in zip(range(start, start + size), boxes)])
        return model.processor(list(images)), torch.tensor(labels), patches

    return data


def attribute_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-attribute cross-entropies summed over the labelled samples and divided by the batch
    size (label -1: the sample does not show that attribute and adds 0), averaged over the
    attributes; and each attribute's accuracy on its labelled samples. Dividing by the whole batch
    keeps N processes with equal slices equal to one process with the whole batch."""
    losses, metrics = [], {}
    for j, (name, out) in enumerate(logits.items()):
        target = labels[:, j]
        losses.append(F.cross_entropy(out.float(), target, ignore_index=-1, reduction="sum") / len(target))
        known = target >= 0
        if known.any():
            metrics[f"acc_{name}"] = float((out[known].argmax(-1) == target[known]).float().mean())
    return torch.stack(losses).mean(), metrics


@torch.no_grad()
def evaluate_attributes(heads: AttributeHeads, processor, n: int = 500, split: str = "test",
                        config: SceneConfig | None = None, batch_size: int = 50) -> dict[str, float]:
    """Accuracy per attribute on single-object scenes 0..n-1 of `split`, every patch in view."""
    config = config or SceneConfig(width=heads.tower.cfg.image_size, height=heads.tower.cfg.image_size)
    was_training = heads.training
    heads.eval()
    correct = {name: 0 for name in ATTRIBUTES}
    for start in range(0, n, batch_size):
        images, labels, _ = zip(*(labelled_scene(i, split, config) for i in range(start, min(n, start + batch_size))))
        logits = heads(processor(list(images)))
        labels = torch.tensor(labels)
        for j, name in enumerate(ATTRIBUTES):
            correct[name] += int((logits[name].argmax(-1) == labels[:, j]).sum())
    heads.train(was_training)
    return {name: round(c / max(n, 1), 4) for name, c in correct.items()}


@torch.no_grad()
def evaluate_dense(heads: DenseAttributeHeads, processor, n: int = 500, split: str = "test",
                   batch_size: int = 50) -> dict[str, float]:
    """Per-patch accuracy on multi-object scenes 0..n-1 of `split`: shape, colour and size over the
    patches an object covers, and `background` (patches no object covers, told apart as such)."""
    cfg = heads.tower.cfg
    config = SceneConfig(width=cfg.image_size, height=cfg.image_size)
    was_training = heads.training
    heads.eval()
    right, total = {name: 0 for name in (*ATTRIBUTES, "background")}, {"object": 0, "background": 0}
    for start in range(0, n, batch_size):
        images, labels = zip(*(dense_scene(i, split, config, cfg.grid, cfg.patch_size)
                               for i in range(start, min(n, start + batch_size))))
        logits, labels = heads(processor(list(images))), torch.cat(labels)
        on = labels[:, 0] != BACKGROUND
        for j, name in enumerate(ATTRIBUTES):
            right[name] += int((logits[name][on].argmax(-1) == labels[on, j]).sum())
        right["background"] += int((logits["shape"][~on].argmax(-1) == BACKGROUND).sum())
        total["object"] += int(on.sum())
        total["background"] += int((~on).sum())
    heads.train(was_training)
    return {name: round(c / max(total["background" if name == "background" else "object"], 1), 4)
            for name, c in right.items()}


def train_attributes(model: DualEncoder, recipe: AttributeRecipe, cfg: TrainConfig, out: str | Path, *,
                     resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Train `model`'s image tower with attribute heads; writes checkpoints, metrics.jsonl,
    loss.png, `out/model` (the dual encoder with the trained tower) and `out/attributes_eval.json`."""
    tower = getattr(model.net, "vision_model", None)
    if not isinstance(tower, VisionTransformer):
        raise ConfigError(f"{type(model.net).__name__} has no ViT image tower to train")
    if recipe.scene_size != tower.cfg.image_size:
        raise ConfigError(f"scene size {recipe.scene_size} differs from the tower's image size "
                          f"{tower.cfg.image_size}: object boxes would not map onto its patches")
    if recipe.patches < 0 or recipe.eval_n < 0 or recipe.unmask_steps < 0:
        raise ConfigError("patches, unmask_steps and eval_n must be non-negative")
    torch.manual_seed(cfg.seed)  # the heads' initialisation
    dense = recipe.dense_layer is not None
    heads = DenseAttributeHeads(tower, recipe.dense_layer) if dense else AttributeHeads(tower)
    heads.requires_grad_(True)

    def step_fn(m, batch):
        pixels, labels, patches = batch
        return attribute_loss(m(pixels, patches), labels)

    trainer = Trainer(heads, step_fn, batch_fn(model, recipe, cfg.batch_size, cfg.seed, cfg.steps), cfg, out,
                      samples_per_batch="images")
    logged = trainer.fit(resume=resume, progress=progress)
    heads.requires_grad_(False)
    if trainer.is_main:
        model.save(Path(out) / "model")
        if recipe.eval_n:
            evaluate = evaluate_dense if dense else evaluate_attributes
            scores = {"split": "test", "n": recipe.eval_n, **({"dense_layer": recipe.dense_layer} if dense else {}),
                      **evaluate(heads, model.processor, recipe.eval_n)}
            atomic_write(Path(out) / EVAL_FILE, (json.dumps(scores, indent=2) + "\n").encode())
    return logged
