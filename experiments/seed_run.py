#!/usr/bin/env python
"""Rebuild a recipe's run folder from the parts it shipped, so that stages appended to the recipe
can be trained with `vlmlab train --recipe R --out RUN --resume` without repeating the first ones
(scenes-smol's take about 3 h on 2 CPU cores). Not part of the library: a script around it.

    python experiments/seed_run.py --recipe R --parts src/vlmlab/weights/scenes-smol --done 8 --out RUN
    vlmlab train --recipe R --out RUN --resume      # trains stages 9.. of R from the shipped weights

What it writes, for a recipe whose model is `[model.assemble]` (+ `[model.tower]`):
  RUN/tower/model + done.json  the tower's dual encoder (`init`) with the parts' vision tower;
  RUN/<i>-<name>/              for each of the first `--done` stages, a finished checkpoint
                               (checkpoint.safetensors + done.json) holding the parts' values of
                               the tensors that stage trains (projector, LoRA adapters, ...).
Then it runs those stages of R with --resume, as `vlmlab train` would: every stage is loaded,
none is trained, and RUN/parts is written (data generated into a run folder, the replay chats, is
generated as in any run, about 10 minutes, unless a copy is put into RUN first). It checks that the feature_norm statistics measured
again equal the parts' and that RUN/parts holds the given parts' tensors (tensors the recipe adds
later, e.g. zero-initialised image_positions, aside); any difference is an error.

The appended stages may add what the first ones never trained (image_positions = true with no
learning rate in the first stages: they stay zero, and the first stages compute what they did).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import vlmlab
from vlmlab.checkpoints.peft import load_adapter
from vlmlab.models.llava import PEFT_KEY_MAP
from vlmlab.train import vlm
from vlmlab.train.trainer import Trainer


def reference(parts: Path) -> dict[str, torch.Tensor]:
    """The parts as one unpacked LlavaNet state dict, LoRA adapters kept apart (not merged): the
    parts loaded without their adapter folder, which is then added unmerged."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
            if (parts / name).is_file():
                (Path(tmp) / name).symlink_to((parts / name).resolve())
        model = vlmlab.load(tmp, dtype=torch.float32)
    with model.unpacked() as net:
        if (parts / "adapter").is_dir():
            load_adapter(net, parts / "adapter", key_map=PEFT_KEY_MAP, merge=False)
        return net.state_dict()


def seed_tower(spec: dict, ref: dict[str, torch.Tensor], out: Path) -> None:
    dual = vlmlab.load(spec["init"])
    prefix = "vision_tower."
    dual.net.vision_model.load_state_dict({k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)},
                                          strict=True)
    dual.save(out / "model")
    (out / "done.json").write_text(json.dumps({"tower": spec["init"], "steps": spec.get("steps"),
                                               "seeded": True}) + "\n")


def seed(recipe: dict | str | Path, parts: Path, done: int, out: Path) -> None:
    """Write the run folder `out` of `recipe` (a dict, built-in name or .toml) whose first `done`
    stages the `parts` folder holds; refuses (SystemExit) parts that are not that run's."""
    recipe = dict(recipe) if isinstance(recipe, dict) else vlm.load_recipe(recipe)
    if "assemble" not in recipe["model"]:
        raise SystemExit("seed_run: only recipes with [model.assemble] ship parts")
    recipe["stages"] = recipe["stages"][:done]
    ref = reference(parts)
    out.mkdir(parents=True, exist_ok=True)
    if "tower" in recipe["model"]:
        seed_tower(recipe["model"]["tower"], ref, out / "tower")

    class Seeded(Trainer):
        def fit(self, resume: bool = False, progress: bool = True) -> list:
            with torch.no_grad():
                for name, p in self._params():
                    p.copy_(ref[name].to(p.dtype))
            self.step = self.cfg.steps
            self.save_checkpoint()
            print(f"seeded {self.out}: {len(self.named)} tensors")
            return []

    vlm.Trainer = Seeded
    try:
        model = vlm.train_recipe(recipe, out, resume=True, progress=False)
    finally:
        vlm.Trainer = Trainer
    with model.unpacked() as net:
        for name, t in net.state_dict().items():
            if name.startswith("feature_norm.") and not torch.equal(t, ref[name]):
                raise SystemExit(f"seed_run: {name} measured again differs from the parts' "
                                 f"(max {(t - ref[name]).abs().max().item():.3g}): not the same tower or data")
    for file in ("model.safetensors", "adapter/adapter_model.safetensors"):
        if not (parts / file).is_file():
            continue
        given, written = load_file(parts / file), load_file(out / "parts" / file)
        if set(given) - set(written) or any(not torch.equal(given[k], written[k]) for k in given):
            raise SystemExit(f"seed_run: {out / 'parts' / file} differs from {parts / file}")
    print(f"{out}: {done} stages seeded; its parts equal {parts}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--parts", required=True, type=Path, help="the shipped parts folder")
    ap.add_argument("--done", required=True, type=int, help="how many of the recipe's stages the parts hold")
    ap.add_argument("--out", required=True, type=Path, help="the run folder to write")
    args = ap.parse_args(argv)
    seed(args.recipe, args.parts, args.done, args.out)

if __name__ == "__main__":
    main()
