"""`vlmlab train attributes`: the supervised warm start of an image tower (shape, colour and size
heads on single-object scenes, trained on the patches around the object)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from vlmlab.data.scenes import COLOR_NAMES, SHAPES, SIZES, SceneConfig
from vlmlab.errors import ConfigError
from vlmlab.train.attributes import (
    AttributeHeads, AttributeRecipe, attribute_loss, batch_fn, evaluate_attributes, labelled_scene, object_patches,
    train_attributes,
)
from vlmlab.train.trainer import TrainConfig, read_metrics

from conftest import tiny_lit as _tiny_lit  # noqa: E402


def test_object_patches_cover_the_box_then_fill_at_random():
    # Box x 20..43, y 5..12 on a 224-px image with 16-px patches (grid 14): columns 1-2, row 0.
    kept = object_patches((20, 5, 44, 13), grid=14, patch=16, keep=10, seed=1)
    assert kept.dtype == torch.long and kept.tolist() == sorted(set(kept.tolist())) and len(kept) == 10
    assert {1, 2} <= set(kept.tolist())
    assert kept.max() < 196
    torch.testing.assert_close(object_patches((20, 5, 44, 13), 14, 16, 10, 1), kept, rtol=0, atol=0)  # seeded
    assert not torch.equal(object_patches((20, 5, 44, 13), 14, 16, 10, 2), kept)
    # An object wider than the budget: a random subset of its own patches only.
    big = object_patches((0, 0, 224, 32), grid=14, patch=16, keep=5, seed=0)
    assert len(big) == 5 and int(big.max()) < 28
    # A box ending exactly on a patch edge does not take the next patch.
    assert object_patches((0, 0, 16, 16), 14, 16, 1, 0).tolist() == [0]
    for bad in (0, 197):
        with pytest.raises(ConfigError, match="patches per image"):
            object_patches((0, 0, 16, 16), 14, 16, bad, 0)


def test_labelled_scene_names_its_object():
    config = SceneConfig(width=64, height=64)
    for i in range(5):
        from vlmlab.data.scenes import classification_sample

        obj = classification_sample(i, "train", config).scenes[0].objects[0]
        image, (shape, color, size), box = labelled_scene(i, "train", config)
        assert (SHAPES[shape], COLOR_NAMES[color], SIZES[size]) == (obj.shape, obj.color, obj.size)
        assert box == obj.box and image.size == (64, 64)


def test_attribute_loss_is_the_mean_cross_entropy_with_batch_accuracies():
    g = torch.Generator().manual_seed(0)
    logits = {name: torch.randn(4, n, generator=g) for name, n in (("shape", 6), ("color", 8), ("size", 2))}
    labels = torch.tensor([[0, 1, 0], [5, 7, 1], [2, 3, 1], [1, 0, 0]])
    loss, metrics = attribute_loss(logits, labels)
    ce = torch.nn.functional.cross_entropy
    expected = (ce(logits["shape"], labels[:, 0]) + ce(logits["color"], labels[:, 1]) + ce(logits["size"], labels[:, 2])) / 3
    torch.testing.assert_close(loss, expected)
    assert metrics["acc_size"] == float((logits["size"].argmax(-1) == labels[:, 2]).float().mean())


def test_batches_split_over_ranks_equal_one_process(minilm_available):
    model = _tiny_lit()
    data = batch_fn(model, AttributeRecipe(patches=12, scene_size=64), batch_size=4, seed=3)
    pixels, labels, patches = data(1, 0, 0, 1, 4)
    assert pixels.shape == (4, 3, 64, 64) and labels.shape == (4, 3) and patches.shape == (4, 12)
    halves = [data(1, 0, rank, 2, 2) for rank in range(2)]
    for j in range(3):
        torch.testing.assert_close(torch.cat([h[j] for h in halves]), [pixels, labels, patches][j], rtol=0, atol=0)
    # Sample i of the run is training scene i, and its object's patches are always kept.
    _, _, box = labelled_scene(5, "train", SceneConfig(width=64, height=64))
    col, row = box[0] // 8, box[1] // 8
    assert row * 8 + col in patches[1].tolist()
    assert batch_fn(model, AttributeRecipe(patches=0, scene_size=64), batch_size=4)(1, 0, 0, 1, 4)[2] is None
    # Unmasked tuning: the last 2 steps of a 5-step run see every patch.
    tuned = batch_fn(model, AttributeRecipe(patches=12, unmask_steps=2, scene_size=64), 4, seed=3, steps=5)
    assert tuned(2, 0, 0, 1, 4)[2].shape == (4, 12) and tuned(3, 0, 0, 1, 4)[2] is None


def _log(path):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(path)]


def test_a_short_run_learns_colour_and_resumes_exactly(tmp_path, minilm_available, monkeypatch):
    """A tiny tower on 64-px scenes, 16 of 64 patches: held-out colour well above the 1/8 chance
    within a CPU minute; a run killed in step 50 (last checkpoint: step 40) and resumed gives the
    uninterrupted run's log and weights."""
    import vlmlab
    import vlmlab.train.attributes as attributes

    recipe = AttributeRecipe(patches=16, scene_size=64, eval_n=200)
    cfg = dict(steps=120, batch_size=32, lr=2e-3, warmup_steps=5, log_every=10, save_every=20, seed=0)
    model = _tiny_lit()
    train_attributes(model, recipe, TrainConfig(**cfg), tmp_path / "a", progress=False)
    scores = json.loads((tmp_path / "a" / "attributes_eval.json").read_text())
    assert scores["n"] == 200 and scores["color"] >= 0.4, scores  # chance 0.125
    # The saved model is the dual encoder with the trained tower; the heads stay in the checkpoint.
    saved = vlmlab.load(tmp_path / "a" / "model")
    assert json.loads((tmp_path / "a" / "model" / "config.json").read_text())["vision_pooling"] == "cls"
    torch.testing.assert_close(saved.net.vision_model.state_dict(), model.net.vision_model.state_dict())

    scene = attributes.labelled_scene

    def killed_in_step_50(index, split, config):
        if index >= 50 * 32:
            raise KeyboardInterrupt
        return scene(index, split, config)

    monkeypatch.setattr(attributes, "labelled_scene", killed_in_step_50)
    with pytest.raises(KeyboardInterrupt):
        train_attributes(_tiny_lit(), recipe, TrainConfig(**cfg), tmp_path / "b", progress=False)
    monkeypatch.setattr(attributes, "labelled_scene", scene)
    resumed = _tiny_lit(seed=5)  # resuming restores every trained weight, whatever the start
    train_attributes(resumed, recipe, TrainConfig(**cfg), tmp_path / "b", resume=True, progress=False)
    assert _log(tmp_path / "b" / "metrics.jsonl") == _log(tmp_path / "a" / "metrics.jsonl")
    torch.testing.assert_close(resumed.net.vision_model.state_dict(), model.net.vision_model.state_dict(),
                               rtol=0, atol=0)


def test_evaluation_sees_every_patch_and_heads_read_the_pooled_embedding(minilm_available):
    model = _tiny_lit()
    heads = AttributeHeads(model.net.vision_model)
    pixels = model.processor([labelled_scene(0, "test", SceneConfig(width=64, height=64))[0]])
    pooled = model.net.vision_model.pool(pixels)
    torch.testing.assert_close(heads(pixels)["shape"], heads.heads["shape"](pooled))
    scores = evaluate_attributes(heads, model.processor, n=10, batch_size=4)
    assert set(scores) == {"shape", "color", "size"} and all(0 <= v <= 1 for v in scores.values())


def test_bad_settings_are_named(tmp_path, minilm_available):
    with pytest.raises(ConfigError, match="scene size 224 differs from the tower's image size 64"):
        train_attributes(_tiny_lit(), AttributeRecipe(scene_size=224), TrainConfig(steps=1), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="non-negative"):
        train_attributes(_tiny_lit(), AttributeRecipe(patches=-1, scene_size=64), TrainConfig(steps=1), tmp_path,
                         progress=False)


def test_cli_trains_attributes_and_reports_held_out_accuracy(tmp_path, minilm_available, capsys):
    from vlmlab.cli.main import main

    assert main(["train", "attributes", "--out", str(tmp_path / "run"), "--arch", "scenes-clip", "--steps", "1",
                 "--batch-size", "2", "--patches", "8", "--eval-n", "4"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_lit_folders_record_their_pooling_and_old_ones_pool_the_mean(tmp_path, minilm_available):
    """`vision_pooling` in config.json: new LiT folders write it; folders from before it existed
    (scenes-clip v0) pooled the mean of the patch tokens and still load that way."""
    import vlmlab

    model = _tiny_lit()
    model.save(tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["vision_pooling"] == "cls" and vlmlab.load(tmp_path / "new").net.vision_model.cfg.pooling == "cls"
    del config["vision_pooling"]
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    assert vlmlab.load(tmp_path / "new").net.vision_model.cfg.pooling == "mean"
    config["vision_pooling"] = "max"
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="vision_pooling 'max'"):
        vlmlab.load(tmp_path / "new")


def test_param_lr_sets_learning_rates_by_name_prefix():
    from vlmlab.cli.main import _train_config, build_parser
    from vlmlab.errors import InputError

    parser = build_parser()
    args = parser.parse_args(["train", "clip", "--out", "x", "--param-lr", "vision_model=0",
                              "--param-lr", "visual_projection=2e-4"])
    assert _train_config(args).param_groups == {"vision_model": 0.0, "visual_projection": 2e-4}
    for bad in ("vision_model", "=0.1", "vision_model=fast", "vision_model=-1"):
        with pytest.raises(InputError, match="--param-lr"):
            _train_config(parser.parse_args(["train", "clip", "--out", "x", "--param-lr", bad]))


# ---------------------------------------------------------------------------------------------
# train clip --attributes: the attribute cross-entropy next to the contrastive loss


def test_attribute_loss_skips_samples_that_do_not_show_an_attribute():
    g = torch.Generator().manual_seed(1)
    logits = {name: torch.randn(4, n, generator=g) for name, n in (("shape", 6), ("color", 8), ("size", 2))}
    labels = torch.tensor([[0, 1, -1], [-1, -1, -1], [2, 3, -1], [1, 0, -1]])  # no size label at all
    loss, metrics = attribute_loss(logits, labels)
    ce = torch.nn.functional.cross_entropy
    known = [0, 2, 3]
    expected = (ce(logits["shape"][known], labels[known, 0], reduction="sum")
                + ce(logits["color"][known], labels[known, 1], reduction="sum")) / 4 / 3  # per sample of 4, 3 attributes
    torch.testing.assert_close(loss, expected)
    assert metrics["acc_shape"] == float((logits["shape"][known].argmax(-1) == labels[known, 0]).float().mean())
    assert "acc_size" not in metrics and torch.isfinite(loss)


def test_scenes_examples_label_single_objects_only():
    from vlmlab.train.clip import scenes_example, scenes_pair

    for i in range(8):
        image, text, labels = scenes_example(i)
        assert (image.tobytes(), text) == (scenes_pair(i)[0].tobytes(), scenes_pair(i)[1])
        if i % 2:  # a full scene with a caption: several objects, nothing to label
            assert labels == (-1, -1, -1)
        else:
            from vlmlab.data.scenes import generate_sample

            obj = generate_sample("classify", i // 2, "train").scenes[0].objects[0]
            assert labels == (SHAPES.index(obj.shape), COLOR_NAMES.index(obj.color), SIZES.index(obj.size))
    # A zoomed object no longer shows its size.
    assert scenes_example(0, zoom=1.0)[2][:2] == scenes_example(0)[2][:2] and scenes_example(0, zoom=1.0)[2][2] == -1


def test_clip_training_with_attribute_heads_resumes_exactly_and_saves_without_them(tmp_path, minilm_available,
                                                                                   monkeypatch):
    import vlmlab
    import vlmlab.train.clip as clip
    from vlmlab.train.clip import ClipRecipe, train_clip

    recipe = ClipRecipe(data="scenes", scene_size=64, multi_positive=True, attributes=0.5)
    cfg = dict(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, save_every=2, seed=0)
    model = _tiny_lit()
    train_clip(model, recipe, TrainConfig(**cfg), tmp_path / "a", progress=False)
    log = read_metrics(tmp_path / "a" / "metrics.jsonl")
    for row in log:
        assert {"acc_shape", "acc_color", "attribute_loss", "contrastive_loss"} <= set(row)
        assert row["loss"] == pytest.approx(row["contrastive_loss"] + 0.5 * row["attribute_loss"], abs=1e-5)
    assert not hasattr(model.net, "attribute_heads")  # dropped after training
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "attribute" in k]
    with safe_open(str(tmp_path / "a" / "checkpoint.safetensors"), "pt") as f:
        assert [k for k in f.keys() if "attribute_heads" in k]  # ... but kept in the checkpoint, for resume
    saved = vlmlab.load(tmp_path / "a" / "model")
    torch.testing.assert_close(saved.net.vision_model.state_dict(), model.net.vision_model.state_dict())

    example = clip.scenes_example

    def killed_in_step_5(index, *args):
        if index >= 5 * 8:
            raise KeyboardInterrupt
        return example(index, *args)

    monkeypatch.setattr(clip, "scenes_example", killed_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_clip(_tiny_lit(), recipe, TrainConfig(**cfg), tmp_path / "b", progress=False)
    monkeypatch.setattr(clip, "scenes_example", example)
    resumed = _tiny_lit(seed=5)
    train_clip(resumed, recipe, TrainConfig(**cfg), tmp_path / "b", resume=True, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "b" / "metrics.jsonl")) == strip(log)
    torch.testing.assert_close(resumed.net.state_dict(), model.net.state_dict(), rtol=0, atol=0)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_clip_attributes_under_torchrun_equal_one_process(tmp_path, minilm_available):
    """The heads sit outside the forward that DDP wraps (as the temperature does) and their loss
    is divided by the whole batch: 2 processes with 4 pairs each train as 1 process with 8."""
    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from launch import assert_same_training, run_helper

    run_helper("tiny_lit_attributes.py", tmp_path / "one", timeout=300)
    run_helper("tiny_lit_attributes.py", tmp_path / "two", procs=2, timeout=300)
    assert_same_training(tmp_path / "one" / "metrics.jsonl", tmp_path / "two" / "metrics.jsonl",
                         tmp_path / "one" / "model" / "model.safetensors", tmp_path / "two" / "model" / "model.safetensors")


def test_clip_attributes_need_the_scenes(tmp_path, minilm_available):
    from vlmlab.train.clip import ClipRecipe, train_clip

    cfg = TrainConfig(steps=1, batch_size=2)
    with pytest.raises(ConfigError, match="scenes data only"):
        train_clip(_tiny_lit(), ClipRecipe(data=str(tmp_path), attributes=1.0), cfg, tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="non-negative"):
        train_clip(_tiny_lit(), ClipRecipe(attributes=-1.0), cfg, tmp_path / "y", progress=False)


def test_patch_labels_name_the_object_under_each_patch_centre():
    from types import SimpleNamespace

    from vlmlab.train.attributes import BACKGROUND, patch_labels

    a = SimpleNamespace(box=(0, 0, 9, 9), shape=SHAPES[2], color=COLOR_NAMES[3], size="large")
    b = SimpleNamespace(box=(5, 5, 13, 13), shape=SHAPES[0], color=COLOR_NAMES[1], size="small")  # drawn on top
    labels = patch_labels([a, b], grid=4, patch=4).view(4, 4, 3)  # patch centres at 2, 6, 10, 14
    want_a = [SHAPES.index(a.shape), COLOR_NAMES.index(a.color), SIZES.index("large")]
    want_b = [SHAPES.index(b.shape), COLOR_NAMES.index(b.color), SIZES.index("small")]
    owner = ["aa..",
             "abb.",
             ".bb.",
             "...."]
    for r in range(4):
        for c in range(4):
            want = {"a": want_a, "b": want_b, ".": [BACKGROUND, -1, -1]}[owner[r][c]]
            assert labels[r, c].tolist() == want, (r, c)


def test_dense_heads_learn_colour_per_patch(tmp_path, minilm_available):
    """--dense: per-patch heads on a layer's patch tokens, multi-object 64-px scenes; a short run
    tells object patches' colour well above chance (1/8) and background from objects."""
    from vlmlab.cli.main import main
    from vlmlab.train.attributes import DenseAttributeHeads

    recipe = AttributeRecipe(scene_size=64, eval_n=100, dense_layer=-1)
    cfg = TrainConfig(steps=80, batch_size=16, lr=2e-3, warmup_steps=5, log_every=10, save_every=40, seed=0)
    model = _tiny_lit()
    train_attributes(model, recipe, cfg, tmp_path / "a", progress=False)
    scores = json.loads((tmp_path / "a" / "attributes_eval.json").read_text())
    assert scores["dense_layer"] == -1 and set(scores) >= {"shape", "color", "size", "background"}
    assert scores["color"] >= 0.4 and scores["background"] >= 0.8, scores
    heads = DenseAttributeHeads(model.net.vision_model, -1)
    pixels = torch.zeros(2, 3, 64, 64)
    assert heads(pixels)["shape"].shape == (2 * 64, len(SHAPES) + 1)
    with pytest.raises(ConfigError, match="dense layer 3"):
        DenseAttributeHeads(model.net.vision_model, 3)
    assert main(["train", "attributes", "--out", str(tmp_path / "cli"), "--arch", "scenes-clip", "--steps", "1",
                 "--batch-size", "2", "--dense", "-2", "--eval-n", "2"]) == 0
