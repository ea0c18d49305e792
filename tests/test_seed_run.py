"""experiments/seed_run.py: a run folder rebuilt from shipped parts continues with appended stages
(`--resume`) exactly as the original run would: the first stages are loaded, not trained again."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmlab.train.vlm import train_recipe

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "seed_run.py"
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "under": "language_model", "lr": 1e-3}
SCENE = {"width": 64, "height": 64, "min_objects": 1, "max_objects": 2}


def _stage(name: str, lora: bool, **groups) -> dict:
    stage = {"name": name, "steps": 1, "batch_size": 1, "warmup_steps": 0, "save_every": 1, "max_length": 160,
             "param_groups": {"": 0.0, "multi_modal_projector": 1e-3, **groups},
             "data": {"source": "scenes", "tasks": "color", "scene": SCENE}}
    return {**stage, "lora": LORA} if lora else stage


@pytest.mark.slow
def test_seeded_run_resumes_into_appended_stages(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("seed_run", SCRIPT)
    seed_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed_run)
    assemble = {"vision": "scenes-clip", "language_model": "smollm2", "image_token": "<empty_output>",
                "vision_feature_layer": -1, "pixel_shuffle": 2, "feature_norm": True}
    shipped = {"name": "t", "model": {"assemble": assemble, "calibration_images": 4},
               "stages": [_stage("a", False), _stage("b", True)]}
    train_recipe(shipped, tmp_path / "orig", progress=False)
    parts = tmp_path / "orig" / "parts"

    grown = {**shipped, "model": {**shipped["model"], "assemble": {**assemble, "image_positions": True}},
             "stages": shipped["stages"] + [_stage("c", True, image_positions=3e-2)]}
    seed_run.seed(grown, parts, 2, tmp_path / "run")
    seeded = load_file(tmp_path / "run" / "parts" / "model.safetensors")
    assert not seeded["image_positions.rows"].any()
    assert all(torch.equal(v, seeded[k]) for k, v in load_file(parts / "model.safetensors").items())
    assert json.loads((tmp_path / "run" / "1-b" / "done.json").read_text())["stage"] == "b"

    from vlmlab.train import trainer

    fitted = []
    fit = trainer.Trainer.fit
    monkeypatch.setattr(trainer.Trainer, "fit", lambda self, *a, **k: fitted.append(self.out.name) or fit(self, *a, **k))
    model = train_recipe(grown, tmp_path / "run", resume=True, progress=False)
    assert fitted == ["2-c"]  # the seeded stages are loaded, only the appended one trains
    assert model.net.image_positions.rows.any()

    with pytest.raises(SystemExit, match="differs"):  # parts that are not this recipe's run are refused
        other = {**grown, "stages": [{**s, "data": {**s["data"], "base_seed": 5}} for s in grown["stages"]]}
        seed_run.seed(other, parts, 2, tmp_path / "run2")

