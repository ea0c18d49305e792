"""experiments/scenes_smol_probe.py (the probes behind docs/scenes-smol.md) still runs: its
object grouping, text view and data (count answers as numbers or enumerated), word-anchored
projector, one-token-per-object view, position read-outs and the place measurements."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import micro_llava
from vlmlab.data.llava_json import read_llava_json
from vlmlab.data.scenes import SceneConfig, generate_sample
from vlmlab.train.attributes import BACKGROUND

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "scenes_smol_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("scenes_smol_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_objects_are_connected_patches_of_one_prediction(probe):
    B = BACKGROUND
    shape = [0, 0, B, 1,
             0, 2, B, 1,
             B, B, B, B,
             0, B, 0, 0]
    color = [5, 5, 0, 3,
             5, 5, 0, 3,
             0, 0, 0, 0,
             5, 0, 5, 1]
    found = probe.objects(shape, color, 4)
    assert sorted(found) == [[0, 1, 4], [3, 7], [5], [12], [14], [15]]


def test_text_view_data_describes_the_scene_instead_of_the_image(probe, tmp_path):
    scene = generate_sample("color", 3, "test", SceneConfig(min_objects=2, max_objects=2)).scenes[0]
    text = probe.describe(scene)
    assert text.startswith("Objects: a ") and text.count(", ") == 1 and text.endswith(".")
    probe.text_data(3, tmp_path)
    samples = read_llava_json(tmp_path / "data.json")
    assert len(samples) == 3
    for s in samples:
        assert not s.images and s.turns[0].text.startswith("Objects: ")
        assert all("<image>" not in t.text for t in s.turns)
    assert json.loads((tmp_path / "data.json").read_text())[0]["conversations"][1]["from"] == "gpt"


def test_enumerated_count_answers_name_what_they_count_and_keep_the_number(probe, tmp_path):
    from vlmlab.eval.metrics import parse_count

    checked = 0
    for i in range(40):
        sample = generate_sample("count", i, "train", SceneConfig(min_objects=1, max_objects=4))
        question, answer = sample.turns[0].text, sample.turns[1].text
        enumerated = probe.enumerated_count(question, sample.scenes[0])
        assert parse_count(enumerated) == int(answer), (question, answer, enumerated)
        listed, number = enumerated.removesuffix(".").split(", so ")
        assert number == answer
        items = [] if listed == "none" else listed.split(", ")
        assert len(items) == int(answer) and all(it.startswith("a ") for it in items), enumerated
        checked += int(answer) > 0
    assert checked >= 10  # non-zero counts were among them
    with pytest.raises(ValueError, match="not a count question"):
        probe.enumerated_count("What color is the large star?", sample.scenes[0])

    class Answers:  # a model that answers with an enumerated count
        def ask(self, messages, images, **kwargs):
            assert "<image>" not in messages[0]["content"] and not images
            return SimpleNamespace(text="a small red circle, a large red circle, so 2.")

    view = probe.TextView(Answers(), final_count=True)
    view.watch([sample])
    assert view.ask([{"role": "user", "content": question}], sample.images) == "2"
    view.final_count = False
    assert view.ask([{"role": "user", "content": question}], sample.images).endswith("so 2.")
    probe.text_data(30, tmp_path, count_answer="enumerate")
    answers = [t.text for s in read_llava_json(tmp_path / "data.json") for t in s.turns if t.role == "assistant"]
    assert any(a.endswith(".") and ", so " in a for a in answers)


def test_anchor_moves_image_tokens_towards_the_words_they_show(probe):
    model = micro_llava()
    net = model.net
    targets, _ = probe.word_targets(model)
    scenes = probe.training_scenes(model, 8)
    pixels = model.processor([im for im, _ in scenes])
    want = torch.stack([targets(labels) for _, labels in scenes])

    def cosine() -> float:
        with torch.no_grad():
            return float(F.cosine_similarity(net.image_features(pixels), want, dim=-1).mean())

    before = cosine()
    probe.anchor(model, n=8, steps=400, batch=8)
    assert cosine() > max(before, 0.0) + 0.3
    assert not any(p.requires_grad for p in net.language_model.parameters())


def test_object_view_gives_a_fixed_number_of_tokens_per_image(probe, tmp_path):
    model = micro_llava()
    torch.save(probe.heads(model, n=8, steps=2).state_dict(), tmp_path / "heads.pt")
    probe.object_view(model, tmp_path / "heads.pt")
    image = generate_sample("color", 0, "test", SceneConfig(width=32, height=32)).images[0]
    ids, pixels = model.prepare("<image>\nWhat is it?", [image])
    assert ids.count(model.image_token_id) == probe.MAX_OBJECT_TOKENS
    assert model.net.image_features(pixels).shape == (1, probe.MAX_OBJECT_TOKENS, model.net.cfg.text.hidden_size)
    assert model.ask("What is it?", [image], max_new_tokens=2).token_ids


def test_positions_reads_the_grid_place_tokens_carry(probe):
    """positions: linear read-outs of a token's row and column, scored on held-out scenes; image
    tokens given strong row and column embeddings are read perfectly."""
    from conftest import MICRO_TEXT, MICRO_VISION
    from vlmlab.train.vlm import new_llava

    model = new_llava(vision=MICRO_VISION, text=MICRO_TEXT, image_token="<empty_output>", image_positions=True)
    with torch.no_grad():
        model.net.image_positions.rows.normal_(std=100.0)
        model.net.image_positions.columns.normal_(std=100.0)
    scores = probe.positions(model, n_train=8, n_test=4)
    assert set(scores) == {"projector input", "image token"}
    assert all(set(s) == {"row", "column"} and all(0 <= v <= 1 for v in s.values()) for s in scores.values())
    assert scores["image token"] == {"row": 1.0, "column": 1.0}


def test_digit_slots_name_each_digit_of_a_box_answer(probe):
    pieces = list("(634,737),(683,817)") + ["<|im_end|>", "5"]
    slots = [s for s in probe.digit_slots(pieces) if s is not None]
    assert slots == [(n, d) for n in ("x0", "y0", "x1", "y1") for d in range(3)]
    assert probe.digit_slots(["(", "12", ",", "5"]) == [None, ("x0", 0), None, ("y0", 0)]


def test_place_measures_boxes_points_first_digits_and_caption_regions(probe):
    """place: a random micro model's scores are all there and in range (its boxes rarely parse, so
    the centre error and correlations may be undefined)."""
    scores = probe.place(micro_llava(), n=2, k=1)
    assert {"ground", "mean IoU", "point", "x0 first digit", "y0 first digit", "caption region"} <= set(scores)
    for key in ("ground", "mean IoU", "point", "x0 first digit", "y0 first digit", "x1 first digit", "y1 first digit"):
        assert 0.0 <= scores[key] <= 1.0, key


def test_base_adds_zero_image_positions_and_keeps_the_adapter_when_asked(probe, tmp_path):
    """base on a parts folder without grid positions (the shipped model has them since v6: stripped first, as v5
    had none) adds zero ones, keeps the adapter when asked, and refuses a folder that has them."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vlmlab.models.llava import IMAGE_POSITIONS_FIELD

    source = tmp_path / "source"
    shutil.copytree(probe.SHIPPED, source)
    config = json.loads((source / "config.json").read_text())
    config.pop(IMAGE_POSITIONS_FIELD, None)
    (source / "config.json").write_text(json.dumps(config))
    tensors = load_file(source / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("image_positions.")}, source / "model.safetensors")
    with pytest.raises(SystemExit, match="already has image positions"):
        probe.base(tmp_path / "shipped", image_positions=True)
    out = probe.base(tmp_path / "v", source=source, adapter=True, image_positions=True)
    config = json.loads((out / "config.json").read_text())
    assert config[IMAGE_POSITIONS_FIELD] is True
    assert sorted(p.name for p in (out / "adapter").iterdir()) == sorted(p.name for p in (probe.SHIPPED / "adapter").iterdir())
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in ("rows", "columns"):
            grid = f.get_tensor(f"image_positions.{name}")
            assert grid.shape == (7, config["text_config"]["hidden_size"]) and not grid.any()
    with pytest.raises(SystemExit, match="already has image positions"):
        probe.base(tmp_path / "w", source=out, image_positions=True)
    assert not (probe.base(tmp_path / "plain", source=source) / "adapter").exists()


def test_token_order_feeds_the_same_tokens_column_by_column_or_both_ways(probe):
    from conftest import MICRO_TEXT, MICRO_VISION
    from vlmlab.train.vlm import new_llava

    def model():
        m = new_llava(vision=MICRO_VISION, text=MICRO_TEXT, image_token="<empty_output>", image_positions=True)
        with torch.no_grad():
            m.net.image_positions.rows.normal_()
        return m

    raster_model = model()
    side = raster_model.net.image_positions.rows.shape[0]
    pixels = torch.randn(2, 3, MICRO_VISION["image_size"], MICRO_VISION["image_size"])
    with torch.no_grad():
        raster = raster_model.net.image_features(pixels)
        assert probe.token_order(raster_model, "raster") is raster_model
        column = probe.token_order(model(), "column").net.image_features(pixels)
        both_model = probe.token_order(model(), "both")
        both = both_model.net.image_features(pixels)
    assert side > 1 and column.shape == raster.shape and both.shape[1] == 2 * side * side
    assert torch.equal(both[:, :side * side], raster) and torch.equal(both[:, side * side:], column)
    for r in range(side):
        for c in range(side):
            assert torch.equal(column[:, c * side + r], raster[:, r * side + c])
    image = generate_sample("color", 0, "test", SceneConfig(width=32, height=32)).images[0]
    ids, _ = both_model.prepare("<image>\nWhat is it?", [image])
    assert ids.count(both_model.image_token_id) == 2 * side * side
    assert both_model.ask("What is it?", [image], max_new_tokens=2).token_ids
    with pytest.raises(ValueError, match="order must be"):
        probe.token_order(model(), "spiral")


def test_box_readout_learns_a_box_its_tokens_hold(probe):
    """The read-out head can reach IoU 0.5 when one token of 49 says where the object is (its grid
    cell, an offset in the cell and the size): it is a fair judge of what tokens carry."""
    torch.manual_seed(0)

    def tokens(n):
        cell = torch.randint(0, 49, (n,))
        off, size = torch.rand(n, 2), 0.05 + 0.1 * torch.rand(n, 2)
        x = torch.zeros(n, 49, 8)
        x[torch.arange(n), cell, 0] = 4.0
        x[torch.arange(n), cell, 1:3] = off
        x[torch.arange(n), cell, 3:5] = size
        centre = torch.stack([(cell % 7 + off[:, 0]) / 7, (cell // 7 + off[:, 1]) / 7], 1)
        return x, torch.cat([centre - size / 2, centre + size / 2], 1)

    head = probe.BoxReadout(8, 49, query=False)
    opt = torch.optim.AdamW(head.parameters(), 3e-3)
    for _ in range(400):
        x, box = tokens(64)
        loss = F.l1_loss(head(x), box)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, box = tokens(200)
    with torch.no_grad():
        pred = head(x)
    ious = [probe.box_iou(a.tolist(), b.tolist()) for a, b in zip(pred, box)]
    assert sum(i >= 0.5 for i in ious) / len(ious) > 0.8


def test_readout_scores_three_token_sets_with_and_without_a_query(probe):
    model = micro_llava()
    for k in (1, 2):
        scores = probe.readout(model, k, n_train=40, n_test=8, steps=5)
        assert set(scores) == {"patch tokens", "projector input", "image tokens"}
        for s in scores.values():
            assert 0 <= s["acc@0.5"] <= 1 and 0 <= s["mean IoU"] <= 1 and s["centre error px"] >= 0
