"""Contrastive training of dual encoders (`vlmlab train clip`): CLIP / SigLIP from a folder, or a
new LiT model (a ViT from scratch against the locked MiniLM text tower, as `scenes-clip` is).

Data is either the synthetic scenes, generated on the fly, or an image-caption JSONL folder
(`vlmlab data synth --format pairs`, or your own). Both are indexed by position in the run, so a
resumed run sees exactly the batches it would have seen.

Scenes batches mix two kinds of pairs: single-object scenes described by their class
("a photo of a small red circle.", in a few phrasings, which is what zero-shot classification
asks) and full scenes with one of their reference captions (positions, sizes, counts, words).

`patch_keep` < 1 trains the image tower on a random fraction of each image's patches (FLIP's
masking, `vision.vit.random_patches`), drawn per sample from the run's seed: the tower's cost per
image falls about in proportion; evaluation and inference see every patch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vlmlab.data.scenes import SceneConfig, generate_sample
from vlmlab.data.scenes.scene import derive_seed
from vlmlab.errors import ConfigError, DataError
from vlmlab.infer.dual import DualEncoder
from vlmlab.train.attributes import attribute_heads, attribute_loss, scene_labels
from vlmlab.train.losses import ContrastiveLoss, clamp_logit_scale
from vlmlab.train.trainer import TrainConfig, Trainer
from vlmlab.vision.vit import random_patches

CLASS_PHRASES = ("a photo of a {}.", "a {}.", "{}", "an image of a {}.", "a picture with a {}.")
COLOR_PHRASES = ("a photo of a {} object.", "something {}.", "a {} shape.")


def scenes_pair(index: int, split: str = "train", config: SceneConfig | None = None,
                zoom: float = 0.0) -> tuple[Any, str]:
    """The index-th training pair of the scenes: (PIL image, text). Deterministic.

    zoom: the fraction of single-object pairs seen through `zoom_crop` (the object drawn larger);
    their texts leave out "small"/"large", which a crop no longer shows."""
    image, text, _ = scenes_example(index, split, config, zoom)
    return image, text


def scenes_example(index: int, split: str = "train", config: SceneConfig | None = None,
                   zoom: float = 0.0) -> tuple[Any, str, tuple[int, int, int]]:
    """`scenes_pair` with the (shape, colour, size) labels of a single-object pair's object
    (`attributes.scene_labels`); -1 where the image does not show one object's attribute: every
    label of a full-scene caption pair, the size of a zoomed object."""
    rng = random.Random(derive_seed("clip-pair", index))
    if index % 2 == 0:  # one object, named by some of its attributes
        s = generate_sample("classify", index // 2, split, config)
        obj, image = s.scenes[0].objects[0], s.images[0]
        zoomed = zoom > 0 and random.Random(derive_seed("clip-zoom", index)).random() < zoom
        if zoomed:
            image = zoom_crop(image, obj.box, random.Random(derive_seed("clip-zoom-crop", index)))
        labels = scene_labels(obj, size_visible=not zoomed)
        r = rng.random()
        if r < 0.15:
            return image, rng.choice(COLOR_PHRASES).format(obj.color), labels
        label = (obj.shape if r < 0.3 else f"{obj.color} {obj.shape}" if r < 0.65 or zoomed
                 else f"{obj.size} {obj.color} {obj.shape}")
        return image, rng.choice(CLASS_PHRASES).format(label), labels
    task = "caption_detailed" if rng.random() < 0.3 else "caption_short"
    s = generate_sample(task, index // 2, split, config)
    return s.images[0], rng.choice(s.turns[-1].answer.value), (-1, -1, -1)


def zoom_crop(image, box: tuple[int, int, int, int], rng: random.Random, max_fill: float = 0.45):
    """A square crop holding the whole `box`, resized (bicubic) back to the image's size, so the
    object covers between its own share of the image and `max_fill` of the side (the side drawn
    log-uniformly): a random-resized crop that keeps the object in view. Shape is easier to
    learn on objects several patches wide; crops of every scale in between carry it down to the
    drawn size."""
    from PIL import Image

    width, height = image.size
    x0, y0, x1, y1 = box
    extent = max(x1 - x0, y1 - y0, 1)
    largest = min(width, height)
    smallest = min(largest, max(extent, math.ceil(extent / max_fill)))
    side = round(math.exp(rng.uniform(math.log(smallest), math.log(largest))))
    left = rng.randint(max(0, x1 - side), min(x0, width - side))
    top = rng.randint(max(0, y1 - side), min(y0, height - side))
    return image.crop((left, top, left + side, top + side)).resize((width, height), Image.BICUBIC)


class PairsFolder:
    """An image-caption JSONL file read once; pair i of epoch e is a fixed permutation of it."""

    def __init__(self, path: str | Path, seed: int = 0):
        from vlmlab.data.pairs import read_pairs

        path = Path(path)
        file = path / "pairs.jsonl" if path.is_dir() else path
        self.pairs = read_pairs(file)
        if not self.pairs:
            raise DataError(f"{file}: no image-caption pairs")
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}

    def __call__(self, index: int) -> tuple[Any, str]:
        epoch, i = divmod(index, len(self.pairs))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))}
        pair = self.pairs[int(self._orders[epoch][i])]
        return pair.image, pair.caption


@dataclass
class ClipRecipe:
    """What `vlmlab train clip` needs besides the generic TrainConfig."""

    data: str = "scenes"  # "scenes" or a folder / .jsonl of image-caption pairs
    loss: str = "infonce"  # infonce | sigmoid
    lock_image: bool = False
    lock_text: bool = False
    scene_size: int = 224
    multi_positive: bool = False  # pairs with identical texts are all positives (see losses.py)
    zoom: float = 0.0  # scenes: the fraction of single-object pairs shown zoomed in (`zoom_crop`)
    patch_keep: float = 1.0  # the fraction of each image's patches the image tower trains on (FLIP)
    attributes: float = 0.0  # scenes: weight of the attribute cross-entropy next to the contrastive loss


def text_groups(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch,) ids equal exactly for identical token sequences, on any process: a fixed random
    linear hash of the real tokens (int64 arithmetic wraps; collisions are negligible)."""
    weights = torch.randint(1, 2**62, (ids.shape[1],), generator=torch.Generator().manual_seed(0))
    real = ids if mask is None else ids * mask
    return (real * weights).sum(-1)


def batch_fn(model: DualEncoder, pair_at: Callable[[int], tuple], batch_size: int,
             patch_keep: float = 1.0, seed: int = 0):
    """data(step, micro, rank, world, size): this rank's slice of the global batch of `step`:
    (pixels, ids, mask, patches), patches None unless patch_keep < 1; when `pair_at` gives
    (image, text, labels) triples (`scenes_example`), the labels (size, 3) follow."""
    patch = model.net.vision_model.cfg.patch_size

    def data(step: int, micro: int, rank: int, world: int, size: int):
        start = step * batch_size + (micro * world + rank) * size
        images, texts, *labels = zip(*(pair_at(i) for i in range(start, start + size)))
        ids, mask = model.text_inputs(list(texts))
        pixels = model.processor(list(images))
        patches = None
        if patch_keep < 1.0:
            n = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
            seeds = [derive_seed("clip-patches", seed, i) for i in range(start, start + size)]
            patches = random_patches(n, patch_keep, seeds)
        batch = (pixels, ids, mask, patches)
        return (*batch, torch.tensor(labels[0])) if labels else batch

    return data


def train_clip(model: DualEncoder, recipe: ClipRecipe, cfg: TrainConfig, out: str | Path, *,
               resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Train `model.net` contrastively; writes checkpoints, metrics.jsonl, loss.png and, at the
    end, the model folder (`out/model`)."""
    net = model.net
    groups = dict(cfg.param_groups)
    if recipe.lock_image:
        groups.update({"vision_model": 0.0, "visual_projection": 0.0})
    if recipe.lock_text:
        groups.update({"text_model": 0.0, "text_projection": 0.0})
    cfg.param_groups = groups
    if not 0.0 <= recipe.zoom <= 1.0:
        raise ConfigError(f"zoom = {recipe.zoom}: expected a fraction in [0, 1]")
    if not 0.0 < recipe.patch_keep <= 1.0:
        raise ConfigError(f"patch_keep = {recipe.patch_keep}: expected a fraction in (0, 1]")
    if recipe.attributes < 0:
        raise ConfigError(f"attributes = {recipe.attributes}: expected a non-negative loss weight")
    if recipe.data == "scenes":
        scene_cfg = SceneConfig(width=recipe.scene_size, height=recipe.scene_size)
        example = scenes_example if recipe.attributes else scenes_pair
        pair_at = lambda i: example(i, "train", scene_cfg, recipe.zoom)  # noqa: E731
    else:
        if recipe.zoom or recipe.attributes:
            raise ConfigError("zoom and attributes apply to the scenes data only (they need each object's box "
                              "and attributes)")
        pair_at = PairsFolder(recipe.data, cfg.seed)
    loss_fn = ContrastiveLoss(recipe.loss)
    if cfg.parallel != "ddp":  # the loss reads logit_scale outside the forward, where FSDP keeps it sharded
        raise ConfigError("contrastive training runs with parallel='ddp' only (FSDP is for the VLM recipes)")
    if recipe.loss == "sigmoid" and getattr(net, "logit_bias", None) is None:
        raise ConfigError("the sigmoid (SigLIP) loss needs a model with a logit_bias (a SigLIP model)")

    if recipe.attributes:
        # Linear heads on the image embedding, trained with it and dropped from the saved model:
        # a part of `net` while training, so that checkpoints, --param-lr prefixes and DDP see them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            projection = getattr(net, "visual_projection", None)  # SigLIP has none: its pooled width
            net.attribute_heads = attribute_heads(projection.out_features if projection is not None
                                                  else net.vision_model.cfg.hidden_size)

    def step_fn(m, batch):
        pixels, ids, mask, patches, *labels = batch
        img, txt = m(pixels, ids, mask, features=True, patches=patches)
        groups = text_groups(ids, mask) if recipe.multi_positive else None
        loss = loss_fn(img, txt, net.logit_scale, getattr(net, "logit_bias", None), groups=groups)
        metrics = {"logit_scale": float(net.logit_scale.detach().exp())}
        if labels:
            extra, accuracy = attribute_loss({k: head(img) for k, head in net.attribute_heads.items()}, labels[0])
            metrics.update(contrastive_loss=float(loss.detach()), attribute_loss=float(extra.detach()), **accuracy)
            loss = loss + recipe.attributes * extra
        return loss, metrics

    net.requires_grad_(True)
    trainer = Trainer(net, step_fn, batch_fn(model, pair_at, cfg.batch_size, recipe.patch_keep, cfg.seed), cfg, out,
                      after_step=lambda m: clamp_logit_scale(m.logit_scale))
    try:
        logged = trainer.fit(resume=resume, progress=progress)
    finally:
        net.requires_grad_(False)
        if recipe.attributes:
            del net.attribute_heads
    if trainer.is_main:
        model.save(Path(out) / "model")
    return logged
