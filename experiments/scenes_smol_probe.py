#!/usr/bin/env python
"""The probes behind docs/scenes-smol.md: what keeps scenes-smol from answering about one of
several objects. Not part of the library; a script around it, kept so that the numbers in that
page can be produced again and the next idea tested the same way.

Run from the repository root with the venv active:

    # base: scenes-smol's tower + projector and plain SmolLM2 (no adapter)       (B's starting point;
    # B was measured on v3's parts, commit ebf318e; the package ships a later one; --model PARTS starts
    # from another parts folder, e.g. v5's, which the --image-positions arms below used:
    # mkdir v5 && git archive a7f9ab0 src/vlmlab/weights/scenes-smol | tar -x --strip-components 4 -C v5)
    python experiments/scenes_smol_probe.py base --out runs/probe/fromB
    # the same tower, a projector regressed onto the words of what each token shows   (A; C with
    # --tower DUAL --pixel-shuffle 1: 196 tokens, a new feature norm; E: a tower trained further).
    # DUAL: scenes-smol's tower as a dual encoder, e.g. RUN/tower/model of `vlmlab train --recipe
    # scenes-smol --out RUN` (its first stage, ~20 min), or `vlmlab train attributes` output
    python experiments/scenes_smol_probe.py anchor --out runs/probe/fromA
    # one training stage from such a folder (the recipe below with `from` = that folder)
    vlmlab train --recipe runs/probe/stage.toml --out runs/probe/runA
    # colour / shape / count / exists on test scenes of exactly k objects
    python experiments/scenes_smol_probe.py eval --model runs/probe/runA/model --objects 1 3 6 --n 20
    # T: the scene graph as text instead of the image
    python experiments/scenes_smol_probe.py text-data --n 1000 --out runs/probe/textdata
    python experiments/scenes_smol_probe.py eval --view text --model runs/probe/runT/model --objects 3 6
    # Tenum: the same with count answers that name the counted objects before the number (Tcount,
    # Tcountenum: add --data-tasks count, every question a count)
    python experiments/scenes_smol_probe.py text-data --n 800 --count-answer enumerate --out runs/probe/textenum
    python experiments/scenes_smol_probe.py eval --view text --count-answer enumerate --model runs/probe/runTenum/model \
        --objects 1 3 6 --tasks count --n 40
    # do image tokens carry their place on the grid? (linear probe: token -> row, column)
    python experiments/scenes_smol_probe.py positions --model runs/probe/runA/model
    # does the language model name where things are? boxes, points, teacher-forced first digits of
    # the box numbers, caption regions, on scenes of exactly k objects
    python experiments/scenes_smol_probe.py place --model runs/probe/runA/model --objects 1 --n 20
    # does the tokens' raster order help y over x? the shipped model with zero grid positions (its
    # adapter kept), one one-object stage (docs/scenes-smol.md) with the tokens fed column by column,
    # in raster order, or both (98 tokens); place then needs the same --order
    python experiments/scenes_smol_probe.py base --keep-adapter --image-positions --out runs/probe/v5pos
    python experiments/scenes_smol_probe.py train --order column --recipe runs/probe/lone.toml --out runs/probe/col
    python experiments/scenes_smol_probe.py place --order column --model runs/probe/col/model --objects 1
    # the same start with 2-D rotary positions for the image tokens (M-RoPE, Qwen3-VL's layout), raster order
    python experiments/scenes_smol_probe.py base --keep-adapter --image-positions --mrope 12,10,10 --interleaved \
        --out runs/probe/v5mrope
    # is the box in the tokens at all? a small attention-pooling head (not the language model) fitted
    # to read it: tower patch tokens, projector input, image tokens; told the object's kind when k > 1
    python experiments/scenes_smol_probe.py readout --objects 1 3
    # boxes and points as location tokens (docs/scenes-smol.md): the one-object stage with
    # `location_tokens = 101` under [model] (beside `from`) and the param group
    # "language_model.model.added_embeddings" = 2e-3; place reads their hundreds as first digits
    vlmlab train --recipe runs/probe/loc.toml --out runs/probe/loc
    python experiments/scenes_smol_probe.py place --model runs/probe/loc/model --objects 1
    # D: one token per object (linear heads find the objects); training needs the same view
    python experiments/scenes_smol_probe.py heads --model runs/probe/fromC --out runs/probe/heads.pt
    python experiments/scenes_smol_probe.py train --view objects --heads runs/probe/heads.pt \\
        --recipe runs/probe/stageD.toml --out runs/probe/runD

The stage (`runs/probe/stage.toml`; for T, data = { source = "runs/probe/textdata" }):

    name = "probe"
    [model]
    from = "runs/probe/fromA"
    [[stages]]
    name = "easy"
    steps = 100
    batch_size = 8
    lr = 1e-3
    warmup_steps = 10
    precision = "auto"
    param_groups = { "" = 0.0, "multi_modal_projector" = 2e-4 }
    lora = { r = 16, alpha = 32, target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
             "up_proj", "down_proj"], under = "language_model", lr = 1e-3 }
    data = { source = "scenes", split = "train", base_seed = 2000000, dialogue_turns = 6,
             tasks = "color,shape,exist,count", scene = { min_objects = 1, max_objects = 3 } }
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import types
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import vlmlab
from vlmlab.connectors.pixel_shuffle import pixel_shuffle
from vlmlab.data.scenes import COLOR_NAMES, SHAPES, SIZES, SceneConfig
from vlmlab.data.scenes.tasks import TEMPLATES, Query
from vlmlab.eval import box_iou
from vlmlab.eval.harness import bench_samples, evaluate
from vlmlab.train.attributes import BACKGROUND, dense_scene

SHIPPED = Path(vlmlab.__file__).parent / "weights" / "scenes-smol"
TASKS = ["color", "shape", "count", "exist"]
MAX_OBJECT_TOKENS = 10  # view "objects": image tokens per image (objects, then background padding)


def base(out: Path, source: Path = SHIPPED, *, adapter: bool = False, image_positions: bool = False,
         mrope: list[int] | None = None, interleaved: bool = False) -> Path:
    """A copy of a parts folder without its LoRA adapter (the plain language model) or, with
    `adapter`, with it; `image_positions`: with zero (untrained) grid positions added; `mrope`:
    with M-RoPE of these sections in the language model (`interleaved`: Qwen3-VL's layout)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(source / name, out / name)
    if adapter:
        shutil.copytree(source / "adapter", out / "adapter", dirs_exist_ok=True)
    if image_positions:
        from safetensors.torch import load_file, save_file

        from vlmlab.models.llava import IMAGE_POSITIONS_FIELD

        config = json.loads((out / "config.json").read_text())
        if config.get(IMAGE_POSITIONS_FIELD):
            raise SystemExit(f"{source} already has image positions")
        config[IMAGE_POSITIONS_FIELD] = True
        (out / "config.json").write_text(json.dumps(config, indent=2))
        tensors = load_file(out / "model.safetensors")
        vision = config["vision_config"]
        side = vision["image_size"] // vision["patch_size"] // config["vlmlab_pixel_shuffle"]
        width = tensors["multi_modal_projector.linear_2.weight"].shape[0]
        tensors.update({f"image_positions.{k}": torch.zeros(side, width) for k in ("rows", "columns")})
        save_file(tensors, out / "model.safetensors")
    if mrope:
        from vlmlab.models.llava import MROPE_FIELD, MROPE_INTERLEAVED_FIELD

        config = json.loads((out / "config.json").read_text())
        config.update({MROPE_FIELD: list(mrope), MROPE_INTERLEAVED_FIELD: interleaved})
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def token_order(model, order: str):
    """Feed the language model the image tokens column by column instead of row by row ("column"),
    or both ways, the 49 tokens in raster order followed by the same in column order ("both", 98
    tokens); each token keeps its own grid position embedding. Which of x and y does the sequence
    order help the language model name?"""
    if order == "raster":
        return model
    if order not in ("column", "both"):
        raise ValueError(f"order must be raster, column or both, not {order!r}")
    net = model.net
    side = net.cfg.vision.image_size // net.cfg.vision.patch_size // net.cfg.pixel_shuffle
    project, per_image = net.project, model.features_per_image

    def reordered(features: torch.Tensor) -> torch.Tensor:
        tokens = project(features)
        column = tokens.unflatten(-2, (side, side)).transpose(-3, -2).flatten(-3, -2)
        return column if order == "column" else torch.cat([tokens, column], dim=-2)

    net.project = reordered
    if order == "both":
        model.features_per_image = lambda pixel_values: 2 * per_image(pixel_values)
    return model


def training_scenes(model, n: int) -> list:
    """(image, per-patch (shape, colour, size) labels) of training scenes 0..n-1, drawn at the
    tower's image size so that the labels fall on its patch grid."""
    vision = model.net.cfg.vision
    config = SceneConfig(width=vision.image_size, height=vision.image_size)
    return [dense_scene(i, "train", config, vision.image_size // vision.patch_size, vision.patch_size)
            for i in range(n)]


def normalised(net, features: torch.Tensor) -> torch.Tensor:
    return net.feature_norm(features) if net.cfg.feature_norm else features


def word_targets(model) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """labels (patches, 3) -> (patches, width): the language model's input embedding of the words
    for what each patch shows (size + colour + shape, or "background"), normalised to the median
    embedding norm."""
    emb = model.net.language_model.model.embed_tokens.weight.detach().float()

    def word(w: str) -> torch.Tensor:
        return emb[model.tokenizer.encode(" " + w)].mean(0)

    shape = torch.stack([word(s) for s in SHAPES] + [word("background")])
    color, size = torch.stack([word(c) for c in COLOR_NAMES]), torch.stack([word(s) for s in SIZES])
    scale = float(emb.norm(dim=1).median())

    def targets(labels: torch.Tensor) -> torch.Tensor:
        s, c, z = labels.unbind(-1)
        on = s != BACKGROUND
        v = shape[s].clone()
        v[on] += color[c[on]] + size[z[on]]
        return v / v.norm(dim=-1, keepdim=True) * scale

    return targets, scale


def anchor(model, n: int = 4000, steps: int = 3000, batch: int = 64, seed: int = 0, calibrate: bool = False) -> None:
    """Regress the projector (nothing else) onto word_targets, pooled like the image tokens;
    `calibrate`: measure the feature norm first (a newly assembled model)."""
    net = model.net
    targets, scale = word_targets(model)
    shuffle = net.cfg.pixel_shuffle
    scenes = training_scenes(model, n)
    with torch.no_grad():
        images = [im for im, _ in scenes]
        if calibrate:
            net.calibrate_feature_norm(model.processor(images[:64]))
        x = torch.cat([normalised(net, net.projector_inputs(model.processor(images[i:i + 64])))
                       for i in range(0, n, 64)])
        y = torch.stack([targets(labels) for _, labels in scenes])
        if shuffle > 1:
            y = pixel_shuffle(y, shuffle).reshape(n, x.shape[1], shuffle**2, -1).mean(2)
    proj = net.multi_modal_projector.requires_grad_(True)
    torch.manual_seed(seed)
    for layer in proj.modules():  # a new projector, as in a first alignment
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        idx = torch.randint(0, n, (batch,))
        loss = F.mse_loss(proj(x[idx]), y[idx]) * y.shape[-1] / scale**2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"anchor step {step}: loss {loss.item():.4f}", flush=True)


def heads(model, n: int = 3000, steps: int = 1500) -> torch.nn.ModuleDict:
    """Linear shape-or-background and colour heads on the projector's inputs (a model without pixel
    shuffle whose feature layer is the last: the tower's last-layer patch tokens)."""
    net = model.net
    if net.cfg.pixel_shuffle != 1:
        raise SystemExit("heads: needs a model without pixel shuffle (196 tokens)")
    scenes = training_scenes(model, n)
    with torch.no_grad():
        x = torch.cat([net.projector_inputs(model.processor([im for im, _ in scenes[i:i + 64]]))
                       for i in range(0, n, 64)]).flatten(0, 1)
    y = torch.stack([labels for _, labels in scenes]).flatten(0, 1)
    out = heads_like(x.shape[-1])
    opt = torch.optim.AdamW(out.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (2048,))
        loss = (F.cross_entropy(out["shape"](x[idx]), y[idx, 0])
                + F.cross_entropy(out["color"](x[idx]), y[idx, 1], ignore_index=-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def objects(shape: list[int], color: list[int], grid: int) -> list[list[int]]:
    """4-connected patches with the same predicted (shape, colour), background left out."""
    seen, found = set(), []
    for start in range(grid * grid):
        if start in seen or shape[start] == BACKGROUND:
            continue
        key, stack, members = (shape[start], color[start]), [start], []
        seen.add(start)
        while stack:
            p = stack.pop()
            members.append(p)
            r, c = divmod(p, grid)
            for q, ok in ((p - grid, r > 0), (p + grid, r < grid - 1), (p - 1, c > 0), (p + 1, c < grid - 1)):
                if ok and q not in seen and (shape[q], color[q]) == key:
                    seen.add(q)
                    stack.append(q)
        found.append(sorted(members))
    return found


def object_view(model, head_file: Path):
    """Replace the image tokens by one per found object (the mean of its projected patches, the
    largest MAX_OBJECT_TOKENS in reading order), padded with the background's mean. Needs a
    model without pixel shuffle."""
    net = model.net
    if net.cfg.pixel_shuffle != 1:
        raise SystemExit("the objects view needs a model without pixel shuffle (196 tokens)")
    grid = net.cfg.vision.image_size // net.cfg.vision.patch_size
    probe = heads_like(net.cfg.vision.hidden_size)
    probe.load_state_dict(torch.load(head_file))
    probe.requires_grad_(False)

    def image_features(self, pixel_values):
        feats = self.projector_inputs(pixel_values)
        with torch.no_grad():
            shape, color = (probe[k](feats.float()).argmax(-1) for k in ("shape", "color"))
        tokens = self.multi_modal_projector(normalised(self, feats))
        rows = []
        for b in range(len(pixel_values)):
            found = sorted(objects(shape[b].tolist(), color[b].tolist(), grid), key=len, reverse=True)
            found = sorted(found[:MAX_OBJECT_TOKENS], key=lambda m: m[0])
            background = (shape[b] == BACKGROUND).nonzero().flatten()
            pad = tokens[b, background].mean(0) if len(background) else tokens[b].mean(0)
            rows.append(torch.stack([tokens[b, m].mean(0) for m in found] + [pad] * (MAX_OBJECT_TOKENS - len(found))))
        return torch.stack(rows)

    net.image_features = types.MethodType(image_features, net)
    model.features_per_image = lambda pixel_values: MAX_OBJECT_TOKENS
    return model


def heads_like(width: int) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({"shape": torch.nn.Linear(width, len(SHAPES) + 1),
                                "color": torch.nn.Linear(width, len(COLOR_NAMES))})


def object_phrase(o) -> str:
    return f"a {o.size} {o.color} {o.shape}"


def describe(scene) -> str:
    """The scene graph in words: "Objects: a large pink star, a small blue circle."."""
    return "Objects: " + (", ".join(object_phrase(o) for o in scene.objects) or "none") + "."


class TextView:
    """Answers with `model`, shown the scene graph in words where the image would be. With
    `final_count`, an answer that ends in ", so N." (`enumerated_count`) is scored as N alone: the
    harness scores counts by exact match, and the objects named before are the model's working."""

    kind, name = "vision-language-model", "text view"

    def __init__(self, model, final_count: bool = False):
        self.model, self.scenes, self.final_count = model, {}, final_count

    def watch(self, samples) -> None:
        self.scenes = {id(s.images[0]): s.scenes[0] for s in samples}

    def ask(self, messages, images=(), **kwargs):
        text = describe(self.scenes[id(images[0])])
        answer = self.model.ask([dict(m, content=m["content"].replace("<image>", text)) for m in messages], [],
                                **kwargs).text
        final = re.search(r", so (\d+)\.?$", answer.strip()) if self.final_count else None
        return final.group(1) if final else answer


def enumerated_count(question: str, scene) -> str:
    """A count answer that names the objects it counts before the number: "a small red circle, a
    large red circle, so 2." ("none, so 0."). The first number is still the count (`parse_count`)."""
    question = question.replace("<image>", "").strip()
    for template in TEMPLATES["count"]:  # "How many {p} are there?" ...; {p} is Query.phrase()
        m = re.fullmatch(re.escape(template).replace(re.escape("{p}"), "(.+)"), question)
        if m is not None:
            break
    else:
        raise ValueError(f"not a count question: {question!r}")
    words = m.group(1).split()
    query = Query(color=next((w for w in words if w in COLOR_NAMES), None),
                  shape=None if words[-1] == "objects" else words[-1].removesuffix("s"),
                  size=next((w for w in words if w in SIZES), None))
    found = [o for o in scene.objects if query.matches(o)]
    return (", ".join(object_phrase(o) for o in found) or "none") + f", so {len(found)}."


def text_data(n: int, out: Path, count_answer: str = "number", tasks: str = "color,shape,exist,count") -> None:
    """n six-question conversations of the `easy` stage with the scene graph in words for the image;
    count_answer "enumerate" names the counted objects before the number (`enumerated_count`)."""
    from vlmlab.train.vlm import sample_source

    source = sample_source({"source": "scenes", "split": "train", "base_seed": 2000000, "dialogue_turns": 6,
                            "tasks": tasks, "scene": {"min_objects": 1, "max_objects": 3}})
    records = []
    for i in range(n):
        s = source(i)
        text = describe(s.scenes[0])
        turns = [t.text for t in s.turns]
        if count_answer == "enumerate":
            for j, t in enumerate(s.turns):
                if t.answer is not None and t.answer.task == "count":
                    turns[j] = enumerated_count(turns[j - 1], s.scenes[0])
        records.append({"id": f"text-{i}", "conversations": [
            {"from": "human" if t.role == "user" else "gpt", "value": value.replace("<image>", text)}
            for t, value in zip(s.turns, turns)]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(records))


def positions(model, n_train: int = 32, n_test: int = 16, ridge: float = 100.0) -> dict[str, dict[str, float]]:
    """How well an image token tells its own place on the grid: linear classifiers (ridge
    regression onto one-hot targets) from each token, the projector's input and the projected token
    the language model reads, to its row and to its column, fitted on the tokens of n_train
    training scenes and scored (accuracy; chance 1/grid) on n_test others. The language model can
    tell where a token is only from what the token carries or from its offset in the sequence."""
    scenes = training_scenes(model, n_train + n_test)
    pixels = model.image_inputs([image for image, _ in scenes])[0]
    with torch.no_grad():
        inputs = model.net.projector_inputs(pixels)
        tokens = model.net.project(inputs).float()
        inputs = inputs.float()
    grid = round(inputs.shape[1] ** 0.5)
    where = {"row": torch.arange(grid).repeat_interleave(grid), "column": torch.arange(grid).repeat(grid)}
    out = {}
    for name, x in (("projector input", inputs), ("image token", tokens)):
        train, test = x[:n_train].flatten(0, 1), x[n_train:].flatten(0, 1)
        mean, std = train.mean(0), train.std(0) + 1e-6
        train, test = (train - mean) / std, (test - mean) / std
        for axis, y in where.items():
            onehot = F.one_hot(y.repeat(n_train), grid).float()
            w = torch.linalg.solve(train.T @ train + ridge * torch.eye(train.shape[1]), train.T @ (onehot - onehot.mean(0)))
            right = (test @ w).argmax(1) == y.repeat(n_test)
            out.setdefault(name, {})[axis] = float(right.float().mean())
    return out


class BoxReadout(torch.nn.Module):
    """A small head that reads an object's box from a set of tokens the way a language model's
    attention could: a score per token (conditioned on the named object's size, colour and shape
    when `query`), a softmax over the tokens, the weighted mean of the tokens' grid centres plus a
    weighted offset and size read from their contents. Boxes as (x0, y0, x1, y1) in 0-1."""

    def __init__(self, width: int, n_tokens: int, query: bool):
        super().__init__()
        g = round(n_tokens ** 0.5)
        rows, cols = torch.arange(g).repeat_interleave(g).float(), torch.arange(g).repeat(g).float()
        self.register_buffer("centres", torch.stack([(cols + 0.5) / g, (rows + 0.5) / g], 1))
        self.grid = g
        self.norm = torch.nn.LayerNorm(width)
        self.query = torch.nn.Embedding(len(SIZES) * len(COLOR_NAMES) * len(SHAPES), 64) if query else None
        self.score = torch.nn.Sequential(torch.nn.Linear(width + (64 if query else 0), 128), torch.nn.GELU(),
                                         torch.nn.Linear(128, 1))
        self.offset = torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.GELU(), torch.nn.Linear(256, 4))

    def forward(self, tokens: torch.Tensor, kind: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(tokens)
        keys = x if self.query is None else torch.cat([x, self.query(kind)[:, None].expand(-1, x.shape[1], -1)], -1)
        a = self.score(keys).squeeze(-1).softmax(-1)[..., None]
        centre = (a * self.centres).sum(1)
        o = (a * self.offset(x)).sum(1)
        cx, cy = centre[:, 0] + o[:, 0] / self.grid, centre[:, 1] + o[:, 1] / self.grid
        w, h = F.softplus(o[:, 2]) * 0.1, F.softplus(o[:, 3]) * 0.1
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def readout(model, k: int = 1, n_train: int = 2000, n_test: int = 300, steps: int = 1500,
            seed: int = 0) -> dict[str, dict[str, float]]:
    """Is an object's box in the tokens at all? A `BoxReadout` fitted (L1 on the box, AdamW, 128
    scenes a step) on n_train training scenes of exactly k objects and scored on n_test test
    scenes: accuracy at IoU 0.5 (what grounding asks), mean IoU, box-centre error in pixels. With k
    > 1 the head is told the size, colour and shape of one object (scenes where another object
    shares all three are skipped). Three token sets: the tower's last-layer patch tokens (196), the
    pixel-shuffled projector input (49) and the projected tokens the language model reads (49)."""
    from vlmlab.data.scenes.tasks import generate_sample

    torch.manual_seed(seed)
    config = SceneConfig(min_objects=k, max_objects=k)
    kinds = {(z, c, s): i for i, (z, c, s) in enumerate((z, c, s) for z in SIZES for c in COLOR_NAMES for s in SHAPES)}

    def draw(split: str, n: int):
        images, boxes, named, index = [], [], [], 0
        while len(images) < n:
            scene_sample = generate_sample("caption_short", index, split, config)
            index += 1
            scene = scene_sample.scenes[0]
            target = scene.objects[torch.randint(len(scene.objects), ()).item()]
            key = (target.size, target.color, target.shape)
            if sum((o.size, o.color, o.shape) == key for o in scene.objects) > 1:
                continue
            images.append(scene_sample.images[0])
            boxes.append([v / d for v, d in zip(target.box, (scene.width, scene.height) * 2)])
            named.append(kinds[key])
        return images, torch.tensor(boxes), torch.tensor(named)

    def token_sets(images) -> dict[str, torch.Tensor]:
        net, out = model.net, {}
        for i in range(0, len(images), 50):
            pixels = model.image_inputs(images[i:i + 50])[0]
            with torch.no_grad():
                states = net.vision_tower(pixels, num_layers=net.cfg.vision.num_hidden_layers,
                                          output_hidden_states=True).hidden_states[-1]
                if net.cfg.vision_feature_select_strategy == "default":
                    states = states[:, 1:]
                shuffled = net.projector_inputs(pixels)
                for name, x in (("patch tokens", states), ("projector input", shuffled),
                                ("image tokens", net.project(shuffled))):
                    out.setdefault(name, []).append(x.float())
        return {name: torch.cat(x) for name, x in out.items()}

    (train_images, train_boxes, train_kinds), (test_images, test_boxes, test_kinds) = (
        draw("train", n_train), draw("test", n_test))
    train_sets, test_sets = token_sets(train_images), token_sets(test_images)
    size = torch.tensor([model.net.cfg.vision.image_size] * 4, dtype=torch.float32)
    results = {}
    for name, train in train_sets.items():
        head = BoxReadout(train.shape[-1], train.shape[1], query=k > 1)
        opt = torch.optim.AdamW(head.parameters(), 2e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
        for _ in range(steps):
            i = torch.randint(0, len(train), (128,))
            loss = F.l1_loss(head(train[i], train_kinds[i]), train_boxes[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        with torch.no_grad():
            pred, truth = head(test_sets[name], test_kinds) * size, test_boxes * size
        ious = np.array([box_iou(a.tolist(), b.tolist()) for a, b in zip(pred, truth)])
        centre = ((pred[:, :2] + pred[:, 2:]) - (truth[:, :2] + truth[:, 2:])).norm(dim=1) / 2
        results[name] = {"acc@0.5": float(np.mean(ious >= 0.5)), "mean IoU": float(ious.mean()),
                         "centre error px": float(centre.mean())}
    return results


BOX_NUMBERS = ("x0", "y0", "x1", "y1")
REGIONS = ("in the top left", "at the top", "in the top right", "on the left", "in the center", "on the right",
           "in the bottom left", "at the bottom", "in the bottom right")


def digit_slots(pieces: list[str]) -> list[tuple[str, int] | None]:
    """For the tokens of a box answer "(x0,y0),(x1,y1)": which number and which of its digits each
    token is (None for the brackets and commas); digits are single tokens in SmolLM2's vocabulary."""
    slots, number, digit = [], 0, 0
    for piece in pieces:
        if piece.isdigit() and number < len(BOX_NUMBERS):
            slots.append((BOX_NUMBERS[number], digit))
            digit += 1
        else:
            slots.append(None)
            if digit:
                number, digit = number + 1, 0
    return slots


def place(model, n: int = 20, k: int = 1) -> dict[str, float]:
    """Does the model know where things are? On n test scenes of exactly k objects: grounding
    (accuracy at IoU 0.5, mean IoU, box-centre error in pixels, correlation of the box centre with
    the true one along x and y), pointing accuracy, the teacher-forced accuracy of each box number's
    first digit (its hundreds: which tenth of the image; chance 0.1; x1 and y1 follow from x0, y0
    and the size; with location tokens, whether the predicted token is in the right hundred), and how often a detailed caption puts a one-object scene's object in the right
    ninth of the image (k = 1 only; chance 1/9)."""
    from vlmlab.train.vlm import IGNORE_INDEX, ChatBatcher

    config = SceneConfig(min_objects=k, max_objects=k)
    report = evaluate(model, split="test", n=n, tasks=["ground", "point"], config=config)
    boxes = [p for p in report.predictions if p.answer.kind == "box"]
    found = [(np.asarray(p.parsed, float), np.asarray(p.answer.value, float)) for p in boxes if p.parsed is not None]
    centres = np.array([((b[:2] + b[2:]) / 2, (t[:2] + t[2:]) / 2) for b, t in found]).reshape(-1, 2, 2)
    out = {"ground": float(np.mean([p.score for p in boxes])),
           "mean IoU": float(np.sum([box_iou(b, t) for b, t in found]) / max(1, len(boxes))),
           "centre error px": float(np.linalg.norm(centres[:, 0] - centres[:, 1], axis=1).mean()) if len(found) else float("nan"),
           "point": float(np.mean([p.score for p in report.predictions if p.answer.kind == "points"]))}
    for j, axis in enumerate("xy"):
        out[f"corr {axis}"] = float(np.corrcoef(centres[:, 0, j], centres[:, 1, j])[0, 1]) if len(found) > 2 else float("nan")
    batcher, hits = ChatBatcher(model), {}
    with torch.no_grad():
        for sample in bench_samples("test", n, ["ground"], config):
            batch = batcher([sample])
            logits = model.net(batch["input_ids"], batch.get("pixel_values"), attention_mask=batch["attention_mask"])
            gold, guess = batch["labels"][0, 1:], logits[0, :-1].argmax(-1)
            at = (gold != IGNORE_INDEX).nonzero().flatten().tolist()
            if getattr(model.tokenizer, "bins", 0):  # location tokens: the hundreds of the coordinate
                tok = model.tokenizer
                coords = [i for i in at if tok.first_id <= int(gold[i]) < tok.vocab_size][:len(BOX_NUMBERS)]
                for name, i in zip(BOX_NUMBERS, coords):
                    right = tok.first_id <= int(guess[i]) < tok.vocab_size and \
                        tok.location_value(int(guess[i])) // 100 == tok.location_value(int(gold[i])) // 100
                    hits.setdefault(name, []).append(float(right))
                continue
            for i, slot in zip(at, digit_slots([model.tokenizer.decode([int(gold[i])]) for i in at])):
                if slot is not None and slot[1] == 0:
                    hits.setdefault(slot[0], []).append(float(guess[i] == gold[i]))
    out.update({f"{name} first digit": float(np.mean(hits[name])) for name in BOX_NUMBERS if name in hits})
    if k == 1:
        captions = evaluate(model, split="test", n=n, tasks=["caption_detailed"], config=config).predictions
        named = [([r for r in REGIONS if r in p.text], [r for r in REGIONS if r in _reference(p.answer.value)])
                 for p in captions]
        out["caption region"] = float(np.mean([bool(said) and said[0] == truth[0] for said, truth in named if truth]))
    return out


def _reference(value) -> str:
    return value if isinstance(value, str) else value[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["base", "anchor", "heads", "text-data", "train", "eval", "positions", "place", "readout"])
    ap.add_argument("--model", type=Path, help="a VLM folder (eval, heads, positions, place; readout: default scenes-smol)")
    ap.add_argument("--tower", type=Path, help="anchor: assemble from this dual encoder's tower instead")
    ap.add_argument("--pixel-shuffle", type=int, default=2, help="anchor with --tower (default 2)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--view", choices=["image", "objects", "text"], default="image")
    ap.add_argument("--order", choices=["raster", "column", "both"], default="raster",
                    help="train, eval, place: the order of the image tokens (column: column by column; both: "
                         "raster, then column)")
    ap.add_argument("--keep-adapter", action="store_true", help="base: keep the LoRA adapter (merged on load)")
    ap.add_argument("--image-positions", action="store_true", help="base: add zero image positions")
    ap.add_argument("--mrope", type=lambda v: [int(n) for n in v.split(",")], metavar="T,H,W",
                    help="base: M-RoPE with these frequency sections in the language model (SmolLM2: sum 32)")
    ap.add_argument("--interleaved", action="store_true", help="base --mrope: Qwen3-VL's interleaved layout")
    ap.add_argument("--heads", type=Path, help="view objects: the file `heads` wrote")
    ap.add_argument("--recipe", type=Path, help="train: the one-stage recipe")
    ap.add_argument("--objects", type=int, nargs="+", default=[1, 3, 6])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--data-tasks", default="color,shape,exist,count", help="text-data: the question mix")
    ap.add_argument("--count-answer", choices=["number", "enumerate"], default="number",
                    help="text-data: count answers as the number, or the counted objects named first; eval --view text: "
                         "score an enumerated count by its final number (64 new tokens)")
    a = ap.parse_args()
    if a.command == "base":
        base(a.out, Path(a.model) if a.model else SHIPPED, adapter=a.keep_adapter,
             image_positions=a.image_positions, mrope=a.mrope, interleaved=a.interleaved)
    elif a.command == "anchor":
        if a.tower:
            model = vlmlab.assemble(a.tower, "smollm2", image_token="<empty_output>", vision_feature_layer=-1,
                                    pixel_shuffle=a.pixel_shuffle, feature_norm=True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                model = vlmlab.load(base(Path(tmp)))
        anchor(model, calibrate=a.tower is not None)
        model.save(a.out)
    elif a.command == "heads":
        torch.save(heads(vlmlab.load(a.model)).state_dict(), a.out)
    elif a.command == "positions":
        for name, scores in positions(vlmlab.load(a.model)).items():
            print(f"{a.model}, {name}:", ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    elif a.command == "readout":
        model = vlmlab.load(a.model or SHIPPED)
        for k in a.objects:
            for name, scores in readout(model, k).items():
                print(f"{a.model or 'scenes-smol'}, {k} objects, {name}:",
                      ", ".join(f"{key} {v:.3f}" for key, v in scores.items()), flush=True)
    elif a.command == "place":
        model = vlmlab.load(a.model)
        model = token_order(model, a.order)
        for k in a.objects:
            print(f"{a.model}, {k} objects:", ", ".join(f"{key} {v:.2f}" for key, v in place(model, a.n, k).items()),
                  flush=True)
    elif a.command == "text-data":
        text_data(a.n, a.out, a.count_answer, a.data_tasks)
    elif a.command == "train":
        import vlmlab.train.vlm as train_vlm

        build, views = train_vlm.build_model, []
        if a.view == "objects":
            views.append(lambda model: object_view(model, a.heads))
        views.append(lambda model: token_order(model, a.order))

        def viewed(*args, **kw):
            model = build(*args, **kw)
            for view in views:
                model = view(model)
            return model

        train_vlm.build_model = viewed
        train_vlm.train_recipe(a.recipe, a.out)
    else:
        model = vlmlab.load(a.model)
        model = token_order(model, a.order)
        if a.view == "objects":
            model = object_view(model, a.heads)
        elif a.view == "text":
            model = TextView(model, final_count=a.count_answer == "enumerate")
        for k in a.objects:
            r = evaluate(model, split="test", n=a.n, tasks=a.tasks,
                         max_new_tokens=64 if a.count_answer == "enumerate" else 24,
                         config=SceneConfig(min_objects=k, max_objects=k))
            print(f"{a.model} ({a.view}), {k} objects:",
                  ", ".join(f"{t} {v:.3f} ({r.counts[t]})" for t, v in r.scores.items()), flush=True)


if __name__ == "__main__":
    main()
