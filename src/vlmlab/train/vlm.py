"""Training generative VLMs (LLaVA, Idefics3 / SmolVLM): chats become token ids whose labels
cover only the assistant's tokens, and stages (projector alignment, instruction tuning, LoRA)
are recipes.

A recipe is a TOML file (`recipes/NAME.toml` in the package, or any path) with a `[model]`
table saying how to build the starting model and a list of `[[stages]]`; each stage names its
data, its `TrainConfig` fields (what trains at which learning rate: `param_groups`, 0 = frozen)
and optionally LoRA adapters. `train_recipe` runs the stages in order, stage i in `out/i-name/`
with its own checkpoint and metrics (each resumable exactly), and writes the result to
`out/model/` (an HF LLaVA folder, LoRA merged) plus `out/adapter/` (PEFT layout) when a stage
used LoRA, and, for an assembled model or a kept adapter, `out/parts/`: the vision tower,
projector and adapter alone, loading the language model by name (`api.save_parts`; what vlmlab
ships).

Model sources in `[model]`:
  new = {...}       a LLaVA built from scratch (`vision`, `text` config fields, `projector`,
                    `tokenizer` = a language model whose tokenizer to use, `image_token`)
  assemble = {...}  parts: `vision` = a dual encoder (its ViT), `language_model` = a decoder
                    (built-in name, GGUF or HF folder), a new `projector`, `image_token`
  from = "DIR"      a saved VLM folder (LLaVA or Idefics3 / SmolVLM); beside it, `keep_adapter = true`
                    trains a parts folder's LoRA adapter further (the stages' `lora` must describe
                    it: same r, alpha, layers) and writes `out/parts` again, and `image_positions`,
                    `mrope_sections`, `mrope_interleaved`, `location_tokens` add to a LLaVA what
                    they give an assembled one (below)
An assembled model may first train its image tower: `[model.tower]` runs `vlmlab train
attributes` (`train.attributes`) in `out/tower/` before anything else, and `assemble` then takes
that trained dual encoder as its `vision`. Fields: `init` (the dual encoder to start from), the
`AttributeRecipe` fields (`dense_layer`, `patches`, `unmask_steps`, `scene_size`, `eval_n`) and
`TrainConfig` fields. It resumes like a stage.
A new or assembled LLaVA with `feature_norm = true` has its projector-input statistics measured
on the images of the first stage's first `calibration_images` samples ([model] field, default 64)
before training. `image_positions = true` (new or assembled) adds a learned row + column embedding
to every image token, zeros until a stage trains them (param group "image_positions");
`mrope_sections = [t, h, w]` gives the decoder M-RoPE (image tokens rotated by row and column;
`mrope_interleaved = true`: Qwen3-VL's frequency layout). `location_tokens = n` writes boxes as
n location tokens, one per coordinate (`text.locations`; param group
"language_model.model.added_embeddings").
A stage's own fields besides the `TrainConfig` ones: `name`, `data`, `lora`, `gradient_checkpointing`,
`max_length`, `system` (a system prompt for every chat), `number_loss = w` (add w x the number
token loss at digit and location tokens, `train.losses.NumberTokenLoss`: boxes, points and counts
learn how far off a digit or coordinate is, not only whether it is right) and `add = {...}` (the
fields above that a LLaVA can be given later, `image_positions`, `mrope_sections`,
`mrope_interleaved`, `location_tokens`, added before the stage: a recipe that grows a trained
model stays one recipe).
"""

from __future__ import annotations

import functools
import json
import tomllib
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.data.scenes.sample import Sample
from vlmlab.errors import ConfigError, DataError
from vlmlab.infer.vlm import IMAGE_MARKER, VisionLanguageModel, render_chat, splice_images
from vlmlab.nn.lora import lora_param_groups
from vlmlab.train.losses import NumberTokenLoss
from vlmlab.train.trainer import TrainConfig, Trainer, distributed_barrier, distributed_setup

IGNORE_INDEX = -100


# ---- chats -> ids and labels --------------------------------------------------------------------


def sample_messages(sample: Sample) -> list[dict[str, str]]:
    """A scenes / LLaVA-JSON sample as chat messages (images stay "<image>" markers)."""
    return [{"role": t.role, "content": t.text} for t in sample.turns]


def chat_tokens(tokenizer, messages: list[dict], *, image_ids: list[list[int]] = (),
                system: str | None = None) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation rendered with the tokenizer's chat template: every
    assistant turn's own tokens (its content and end-of-turn) are labelled, everything else
    (system, user turns, the assistant header, image placeholders) is IGNORE_INDEX. Each turn's
    prompt is the template rendered up to it with the generation prompt, exactly what `ask`
    feeds the model at inference. `image_ids`: what each image's "<image>" marker becomes, in
    order (`VisionLanguageModel.image_inputs`: LLaVA's placeholders, Idefics3's tiles)."""
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError("a training conversation needs at least one assistant turn")
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    images = list(image_ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConfigError("the chat template does not render a conversation as a growing prefix; "
                              "assistant-only labels cannot be placed")
        part = prompt[len(done):]
        n = part.count(IMAGE_MARKER)
        prompt_ids, images = splice_images(tokenizer, part, images[:n]), images[n:]
        answer_ids = tokenizer.encode(full[len(prompt):], add_special_tokens=False)
        ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        done = full
    if images:
        raise DataError(f"the conversation has {len(image_ids) - len(images)} {IMAGE_MARKER} marker(s) before its "
                        f"last answer but {len(image_ids)} image(s)")
    return ids, labels


class ChatBatcher:
    """Samples -> a padded training batch for a `VisionLanguageModel`'s network."""

    def __init__(self, model: VisionLanguageModel, max_length: int | None = None, system: str | None = None):
        self.model, self.system = model, system
        self.max_length = max_length or model.net.context_length
        self.pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        rows, pixels = [], []
        for s in samples:
            px, image_ids = self.model.image_inputs(list(s.images)) if s.images else (None, [])
            if px is not None:
                pixels.append(px)
            ids, labels = chat_tokens(self.model.tokenizer, sample_messages(s), image_ids=image_ids, system=self.system)
            if len(ids) > self.max_length:
                raise DataError(f"sample {s.id}: {len(ids)} tokens with its images, more than max_length "
                                f"{self.max_length}")
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):  # right padding: positions start at 0 in every row
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                 "num_items": int((labels[:, 1:] != IGNORE_INDEX).sum())}  # the Trainer weighs losses by it
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


def next_token_step(model: nn.Module, batch: dict[str, torch.Tensor], numbers: NumberTokenLoss | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the labelled tokens (the head runs only at the positions predicting them),
    a mean over them; with `numbers`, each digit token's term adds numbers.weight x its number
    token loss (`train.losses.NumberTokenLoss`), still divided by the number of labelled tokens."""
    targets = batch["labels"][:, 1:]
    at = torch.zeros_like(batch["labels"], dtype=torch.bool)
    at[:, :-1] = targets != IGNORE_INDEX
    logits = model(batch["input_ids"], batch.get("pixel_values"), attention_mask=batch["attention_mask"],
                   logits_at=at)
    gold = targets[targets != IGNORE_INDEX]
    if gold.numel() == 0:
        raise DataError("a training batch has no labelled (assistant) tokens")
    loss = F.cross_entropy(logits.float(), gold)
    metrics = {"token_acc": float((logits.argmax(-1) == gold).float().mean()), "tokens": float(gold.numel())}
    if numbers is not None:
        distance, digits = numbers(logits, gold)
        loss = loss + numbers.weight * distance / gold.numel()
        metrics["digit_distance"] = float(distance.detach()) / max(digits, 1)  # mean expected |digit error|
    return loss, metrics


# ---- data sources ---------------------------------------------------------------------------------


def sample_source(spec: dict[str, Any], seed: int = 0, run: Path | None = None) -> Callable[[int], Sample]:
    """index -> Sample, deterministic. spec: {source = "scenes", tasks = "vqa:2,caption", split,
    scene = {SceneConfig fields}, dialogue_turns = k (questions per scene, `SceneStream`)} or
    {source = "PATH" of a LLaVA-JSON file or folder}, or several of those mixed:
    {mix = [{weight = 0.9, source = ...}, {weight = 0.1, source = ...}]}, where sample i comes from
    a part drawn (seeded by i) in proportion to the weights, as that part's sample i (e.g. text-only
    chats mixed into scene data so that the language model keeps chatting), or
    {source = "replay", language_model = NAME, n, max_new_tokens}: the language model's own
    answers to n text-only requests (`vlmlab.data.replay`), generated once into the run folder `run`."""
    if "mix" in spec:
        return _mixed_source(spec, seed, run)
    spec = dict(spec)
    source = spec.pop("source", "scenes")
    if source == "scenes":
        from vlmlab.data.scenes.scene import SceneConfig
        from vlmlab.data.scenes.stream import SceneStream
        from vlmlab.data.scenes.tasks import TaskMix

        mix = TaskMix.parse(spec.pop("tasks")) if "tasks" in spec else None
        try:
            config = SceneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.pop("scene", {}).items()})
        except TypeError as e:
            raise ConfigError(f"data.scene: {e}") from None
        stream = SceneStream(spec.pop("split", "train"), mix, config, base_seed=spec.pop("base_seed", 0),
                             rank=0, world_size=1, dialogue_turns=spec.pop("dialogue_turns", 1))
        _no_extra(spec, "data")
        return stream.sample
    from vlmlab.data.llava_json import read_llava_json

    if source == "replay":
        from vlmlab.data.replay import replay_folder

        if run is None:
            raise ConfigError("data: a 'replay' source is generated into a run folder; none was given")
        source = replay_folder(spec, run, generate=distributed_setup()[0] == 0)
        distributed_barrier()  # the main process generates, the others read it
        spec = {}
    path = Path(source)
    samples = read_llava_json(path / "data.json" if path.is_dir() else path, spec.pop("image_root", None))
    _no_extra(spec, "data")
    if not samples:
        raise DataError(f"{source}: no samples")
    orders: dict[int, np.ndarray] = {}

    def get(index: int) -> Sample:
        epoch, i = divmod(index, len(samples))
        if epoch not in orders:
            orders.clear()
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(len(samples))
        return samples[int(orders[epoch][i])]

    return get


def _mixed_source(spec: dict[str, Any], seed: int, run: Path | None) -> Callable[[int], Sample]:
    parts = spec["mix"]
    _no_extra({k: v for k, v in spec.items() if k != "mix"}, "data")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        raise ConfigError("data.mix: expected a list of tables, each a data source with a 'weight'")
    weights = []
    for i, part in enumerate(parts):
        w = part.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise ConfigError(f"data.mix[{i}]: 'weight' must be a positive number, got {w!r}")
        weights.append(float(w))
    sources = [sample_source({k: v for k, v in part.items() if k != "weight"}, seed, run) for part in parts]
    edges = np.cumsum(weights) / sum(weights)

    def get(index: int) -> Sample:
        u = np.random.default_rng([seed, 0x6D6978, index]).random()
        return sources[min(int(np.searchsorted(edges, u, side="right")), len(sources) - 1)](index)

    return get


def batches(source: Callable[[int], Sample], batcher: ChatBatcher, batch_size: int):
    """The Trainer's data function: this rank's micro-slice of the global batch of `step`."""

    def data(step: int, micro: int, rank: int, world: int, size: int):
        start = step * batch_size + (micro * world + rank) * size
        return batcher([source(start + i) for i in range(size)])

    return data


# ---- recipes ----------------------------------------------------------------------------------------


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """A recipe by built-in name (`recipes/NAME.toml`) or TOML file path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        builtin = resources.files("vlmlab") / "recipes" / f"{name_or_path}.toml"
        if not builtin.is_file():
            names = sorted(p.name.removesuffix(".toml") for p in (resources.files("vlmlab") / "recipes").iterdir()
                           if p.name.endswith(".toml"))
            raise ConfigError(f"unknown recipe {str(name_or_path)!r}; built-in recipes: {', '.join(names)} "
                              "(or pass a .toml file)")
        text, origin = builtin.read_text(), f"recipe {name_or_path}"
    else:
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        text, origin = path.read_text(), str(path)
    try:
        recipe = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin}: not valid TOML ({e})") from None
    if not isinstance(recipe.get("model"), dict) or not recipe.get("stages"):
        raise ConfigError(f"{origin}: a recipe needs a [model] table and at least one [[stages]] entry")
    recipe["origin"] = origin
    return recipe


def _no_extra(spec: dict, where: str) -> None:
    if spec:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(spec))}")


def build_model(spec: dict[str, Any], out: str | Path | None = None, *, resume: bool = False,
                progress: bool = True) -> VisionLanguageModel:
    """The starting model of a recipe (see the module docstring); a `[model.tower]` trains in
    `out/tower` first."""
    import vlmlab

    _no_extra({k: v for k, v in spec.items()
               if k not in ("new", "assemble", "from", "calibration_images", "tower", *FROM_OPTIONS)}, "[model]")
    kinds = [k for k in ("new", "assemble", "from") if k in spec]
    if len(kinds) != 1:
        raise ConfigError("[model] needs exactly one of 'new', 'assemble' or 'from'")
    if "tower" in spec:
        if "assemble" not in spec or "vision" in spec["assemble"]:
            raise ConfigError("[model.tower] trains the vision tower of [model.assemble], which then must not "
                              "name its own 'vision'")
        if out is None:
            raise ConfigError("[model.tower] needs a run folder to train in")
        vision = train_tower(spec["tower"], Path(out) / "tower", resume=resume, progress=progress)
        spec = {**spec, "assemble": {**spec["assemble"], "vision": str(vision)}}
    if "from" in spec:
        return _from_model(spec)
    if given := [k for k in FROM_OPTIONS if k in spec]:
        raise ConfigError(f"[model] {', '.join(given)}: options of a 'from' model; [model.assemble] has its own")
    try:
        if "new" in spec:
            return new_llava(**spec["new"])
        return vlmlab.assemble(**spec["assemble"])
    except TypeError as e:
        raise ConfigError(f"[model]: {e}") from None


# What a trained LLaVA can be given later (beside `from`, or in a stage's `add`)
ADDITIONS = ("image_positions", "mrope_sections", "mrope_interleaved", "location_tokens")
FROM_OPTIONS = ("keep_adapter", *ADDITIONS)  # [model] fields beside `from`


def _from_model(spec: dict[str, Any]) -> VisionLanguageModel:
    """`[model] from = DIR` with what FROM_OPTIONS add: `keep_adapter = true` keeps a parts folder's
    LoRA adapter as LoRA layers, which the stages (with the same `lora`) train further, and the run
    then writes `out/parts` again (what vlmlab ships: the adapter stays the one size); grid positions,
    M-RoPE and location tokens as `assemble` gives a new model (`add_to_model`)."""
    import vlmlab

    keep = spec.get("keep_adapter", False)
    if not isinstance(keep, bool):
        raise ConfigError(f"[model] keep_adapter must be true or false, got {keep!r}")
    model = vlmlab.load(spec["from"], keep_adapter=keep)
    if not isinstance(model, VisionLanguageModel):
        raise ConfigError(f"[model] from: {model.name} is not a vision-language model")
    add_to_model(model, {k: spec[k] for k in ADDITIONS if k in spec}, "[model]")
    return model


def add_to_model(model: VisionLanguageModel, spec: dict[str, Any], where: str) -> None:
    """Give a trained LLaVA the ADDITIONS in `spec` (grid positions, zeros; M-RoPE; location
    tokens started on the digit ruler) as a new one gets them from its config."""
    _no_extra({k: v for k, v in spec.items() if k not in ADDITIONS}, where)
    positions = {k: spec[k] for k in ("image_positions", "mrope_sections", "mrope_interleaved") if k in spec}
    if not hasattr(model.net, "add_positions") and (positions or spec.get("location_tokens")):
        raise ConfigError(f"{where} {', '.join(spec)}: {model.name} is not a LLaVA")
    if positions:
        with model.unpacked() as net:
            net.add_positions(**positions)
    if spec.get("location_tokens"):
        from vlmlab.text.locations import add_location_tokens

        add_location_tokens(model, spec["location_tokens"])


def _parts_language_model(spec: dict[str, Any]) -> str | None:
    """The language model a recipe's `out/parts` names (an assembled model, or a parts folder whose
    adapter trains further), or None: the run writes no parts."""
    if "assemble" in spec:
        return spec["assemble"]["language_model"]
    if spec.get("keep_adapter"):
        from vlmlab.api import PARTS_FIELD
        from vlmlab.checkpoints.hf import read_config
        from vlmlab.checkpoints.resolve import resolve

        return read_config(resolve(str(spec["from"])))[PARTS_FIELD]
    return None


def train_tower(spec: dict[str, Any], out: Path, *, resume: bool = False, progress: bool = True) -> Path:
    """`[model.tower]`: `vlmlab train attributes` of the dual encoder `init` into `out`; returns the
    trained dual encoder's folder (`out/model`). A finished run (`out/done.json`) is not repeated
    on resume."""
    import vlmlab
    from vlmlab.infer.dual import DualEncoder
    from vlmlab.train.attributes import AttributeRecipe, train_attributes

    spec = dict(spec)
    if "init" not in spec:
        raise ConfigError("[model.tower] needs 'init': the dual encoder whose image tower it trains")
    init = spec.pop("init")
    try:
        recipe = AttributeRecipe(**{f.name: spec.pop(f.name) for f in fields(AttributeRecipe) if f.name in spec})
    except TypeError as e:
        raise ConfigError(f"[model.tower]: {e}") from None
    cfg = _train_config(spec, "[model.tower]")
    done = out / "done.json"
    if resume and done.is_file():
        return out / "model"
    done.unlink(missing_ok=True)
    model = vlmlab.load(init)
    if not isinstance(model, DualEncoder):
        raise ConfigError(f"[model.tower] init: {init!r} is not a dual encoder")
    train_attributes(model, recipe, cfg, out, resume=resume and (out / "checkpoint.safetensors").is_file(),
                     progress=progress)
    if distributed_setup()[0] == 0:
        done.write_text(json.dumps({"tower": str(init), "steps": cfg.steps}) + "\n")
    distributed_barrier()  # out/model and done.json are written by the main process
    return out / "model"


def new_llava(*, vision: dict[str, Any], text: dict[str, Any], tokenizer: str = "smollm2",
              image_token: str = "<image>", projector: str = "mlp2x_gelu", vision_feature_layer: int = -1,
              vision_feature_select_strategy: str = "default", pixel_shuffle: int = 1,
              feature_norm: bool = False, image_positions: bool = False, mrope_sections: list[int] | None = None,
              mrope_interleaved: bool = False, seed: int = 0) -> VisionLanguageModel:
    """A LLaVA with every weight new (HF's init: normal(0, 0.02) matrices and embeddings, zero
    biases, unit norms): a CLIP-style ViT from `vision` fields, a Llama decoder from `text` HF
    fields, sized to the vocabulary of `tokenizer` (the tokenizer and chat template of that
    language model, built-in name or path)."""
    from vlmlab.checkpoints.gguf import read_gguf
    from vlmlab.checkpoints.resolve import resolve
    from vlmlab.models.llava import VISION_FAMILIES, LlavaConfig, LlavaNet
    from vlmlab.text.llama import LlamaConfig
    from vlmlab.vision.preprocess import ImageProcessor
    from vlmlab.text.tokenizer import Tokenizer
    from vlmlab.vision.vit import ViTConfig

    path = resolve(tokenizer)
    tok = Tokenizer.from_gguf(read_gguf(path)) if path.is_file() else Tokenizer.from_folder(path)
    token_id = tok.token_to_id(image_token)
    if token_id is None:
        raise ConfigError(f"image_token {image_token!r} is not a token of {tokenizer}'s tokenizer")
    text = {"vocab_size": tok.vocab_size, "tie_word_embeddings": True, "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id, **text}
    defaults, switches = VISION_FAMILIES["clip_vision_model"]
    vision_cfg = ViTConfig.from_hf({**defaults, **vision}, **switches)
    cfg = LlavaConfig(vision_cfg, LlamaConfig.from_hf(text), projector=projector,
                      vision_feature_layer=vision_feature_layer,
                      vision_feature_select_strategy=vision_feature_select_strategy, image_token_id=token_id,
                      pixel_shuffle=pixel_shuffle, feature_norm=feature_norm, image_positions=image_positions,
                      mrope_sections=mrope_sections, mrope_interleaved=mrope_interleaved)
    torch.manual_seed(seed)
    net = LlavaNet(cfg)
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for name, p in net.named_parameters():
        if name.endswith("class_embedding"):
            nn.init.normal_(p, std=0.02)
    net.tie_weights()
    return VisionLanguageModel(net, tok, ImageProcessor.clip(vision_cfg.image_size), name="new-llava")


def _train_config(spec: dict[str, Any], where: str, also: tuple[str, ...] = ()) -> TrainConfig:
    """A TrainConfig from the TrainConfig fields of `spec`; a field that is neither those nor one of
    `also` is named."""
    names = {f.name for f in fields(TrainConfig)}
    _no_extra({k: v for k, v in spec.items() if k not in names and k not in also}, where)
    return TrainConfig(**{k: v for k, v in spec.items() if k in names})


def _stage_config(stage: dict[str, Any]) -> TrainConfig:
    return _train_config(stage, f"stage {stage.get('name', '?')!r}",
                         also=("name", "data", "lora", "gradient_checkpointing", "max_length", "system",
                               "number_loss", "add"))


def _number_loss_weight(stage: dict[str, Any]) -> float:
    weight = stage.get("number_loss", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ConfigError(f"stage {stage.get('name', '?')!r}: number_loss must be a weight >= 0 (0 = off), "
                          f"got {weight!r}")
    return float(weight)


def train_recipe(recipe: dict[str, Any] | str | Path, out: str | Path, *, resume: bool = False,
                 progress: bool = True, parallel: str | None = None) -> VisionLanguageModel:
    """Run every stage of `recipe` into `out`; returns the trained model (saved to out/model).
    `parallel` ("ddp" or "fsdp", under torchrun) overrides what the stages say."""
    if not isinstance(recipe, dict):
        recipe = load_recipe(recipe)
    for stage in recipe["stages"]:  # a mistake in the last stage is named before the first trains
        _stage_config(stage)
        _number_loss_weight(stage)
        if not isinstance(add := stage.get("add", {}), dict):
            raise ConfigError(f"stage {stage.get('name', '?')!r}: add must be a table of {', '.join(ADDITIONS)}")
        _no_extra({k: v for k, v in add.items() if k not in ADDITIONS}, f"stage {stage.get('name', '?')!r} add")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(recipe["model"], out, resume=resume, progress=progress)
    with model.unpacked() as net:  # trained as ordinary nn.Linear layers, packed for inference after
        _train_stages(model, net, recipe, out, resume=resume, progress=progress, parallel=parallel)
    return model


def _train_stages(model: VisionLanguageModel, net: nn.Module, recipe: dict[str, Any], out: Path, *,
                  resume: bool, progress: bool, parallel: str | None) -> None:
    """train_recipe's work on the unpacked `net` of `model`: stages, adapter, parts, out/model."""
    from vlmlab.nn.checkpointing import set_gradient_checkpointing

    if getattr(net.cfg, "feature_norm", False) and "from" not in recipe["model"]:
        first = recipe["stages"][0]
        first_data = sample_source(first.get("data", {"source": "scenes"}), seed=_stage_config(first).seed, run=out)
        _calibrate(model, first_data, recipe["model"].get("calibration_images", 64))
    lora_used = None
    for i, stage in enumerate(recipe["stages"]):
        name = stage.get("name", f"stage{i}")
        cfg = _stage_config({**stage, **({"parallel": parallel} if parallel else {})})
        if "add" in stage:  # before a finished stage's checkpoint loads too: it holds what was added
            add_to_model(model, stage["add"], f"stage {name!r} add")
        if "lora" in stage:
            lora_used, adapted = _add_lora(net, stage["lora"], seed=cfg.seed + i)
            lr = stage["lora"].get("lr", cfg.lr)
            adapters = {k: v for k, v in lora_param_groups(adapted, lr).items() if k}  # not its "" = 0
            cfg.param_groups = {**cfg.param_groups, **adapters}
        set_gradient_checkpointing(net, bool(stage.get("gradient_checkpointing", False)))
        stage_dir = out / f"{i}-{name}"
        source = sample_source(stage.get("data", {"source": "scenes"}), seed=cfg.seed, run=out)
        batcher = ChatBatcher(model, stage.get("max_length"), stage.get("system"))
        step = next_token_step
        if weight := _number_loss_weight(stage):
            step = functools.partial(next_token_step, numbers=NumberTokenLoss(model.tokenizer, weight))
        trainer = Trainer(net, step, batches(source, batcher, cfg.batch_size), cfg, stage_dir,
                          samples_per_batch="samples", find_unused_parameters=True)
        done = stage_dir / "done.json"
        if resume and done.is_file():  # finished before: its checkpoint holds the stage's final weights
            trainer.load_checkpoint()
            continue
        done.unlink(missing_ok=True)
        trainer.fit(resume=resume and (stage_dir / "checkpoint.safetensors").is_file(), progress=progress)
        if trainer.is_main:
            done.write_text(json.dumps({"stage": name, "steps": cfg.steps}) + "\n")
    set_gradient_checkpointing(net, False)
    net.eval()
    if lora_used is not None:
        from vlmlab.checkpoints.peft import save_adapter
        from vlmlab.models.llava import PEFT_KEY_MAP

        save_adapter(net, out / "adapter", lora_used, base_model_name_or_path=str(recipe.get("name", "")),
                     key_map=PEFT_KEY_MAP)
    if (language_model := _parts_language_model(recipe["model"])) is not None:
        # what vlmlab ships: vision tower, projector, adapter; the language model by name
        from vlmlab.api import save_parts

        save_parts(model, out / "parts", language_model, adapter=out / "adapter" if lora_used is not None else None)
    if lora_used is not None:
        from vlmlab.nn.lora import merge_lora

        merge_lora(net)
    model.save(out / "model")


def _calibrate(model: VisionLanguageModel, source: Callable[[int], Sample], n: int) -> None:
    """Measure a new model's feature_norm statistics on the images of the first samples of `source`
    (n images; samples with several images give several)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"[model] calibration_images must be an integer >= 2, got {n!r}")
    images, i = [], 0
    while len(images) < n:
        images += source(i).images
        i += 1
        if i > 10 * n and not images:
            raise ConfigError("feature_norm calibration: the first stage's data gives no images")
    model.net.calibrate_feature_norm(model.image_inputs(images[:n])[0])


def _add_lora(net: nn.Module, spec: dict[str, Any], seed: int):
    """(LoRAConfig, adapted module names): adapters added per `spec` (fields of LoRAConfig, plus
    `lr`), initialised from `seed` alone (a run resumed after an earlier stage starts this one as
    the uninterrupted run did), or the ones an earlier stage added."""
    from vlmlab.nn.lora import LoRAConfig, LoRALinear, apply_lora, linear_layers

    spec = {k: v for k, v in spec.items() if k != "lr"}
    if "target_modules" in spec and isinstance(spec["target_modules"], list):
        spec["target_modules"] = tuple(spec["target_modules"])
    try:
        cfg = LoRAConfig(**spec)
    except TypeError as e:
        raise ConfigError(f"lora: {e}") from None
    existing = {n: m for n, m in net.named_modules() if isinstance(m, LoRALinear)}
    if existing:  # an earlier stage's, or a kept adapter's: the stage must describe them as they are
        wanted = {n for n, _ in linear_layers(net) if cfg.selects(n)}
        odd = sorted(n for n, m in existing.items() if (m.r, m.scaling) != (cfg.r, cfg.scaling))
        if wanted != set(existing) or odd:
            some = next(iter(existing.values()))
            raise ConfigError(f"lora {spec}: the model already has LoRA adapters (r={some.r}, alpha={some.alpha}, on "
                              f"{len(existing)} layers such as {sorted(existing)[0]}), and this stage's would differ "
                              f"({len(wanted)} layers, r={cfg.r}, alpha={cfg.alpha}); a stage trains the adapters "
                              "there are")
        return cfg, list(existing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cfg, apply_lora(net, cfg)


__all__ = ["IGNORE_INDEX", "ChatBatcher", "build_model", "chat_tokens", "load_recipe", "next_token_step",
           "new_llava", "sample_messages", "sample_source", "train_recipe", "train_tower"]
