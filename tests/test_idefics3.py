"""Idefics3 / SmolVLM against transformers' Idefics3ForConditionalGeneration and Idefics3Processor
(PIL backend) on tiny random configs: logits with 0, 1 and 2 images (split into tiles, and
batches padded with all-zero images), image features, NaViT-style positions at a grid where
transformers' rounding repeats ids, pixel shuffle, the prompt ids and pixel values of the
processor (split and unsplit, photos and random images), greedy generation through `vlmlab.load`
+ `ask`, strict loading, the placeholder count check, and saving (transformers loads the model
and the processor back)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import vlmlab  # noqa: E402
from vlmlab.checkpoints.hf import read_config, read_safetensors, write_json  # noqa: E402
from vlmlab.connectors.pixel_shuffle import pixel_shuffle  # noqa: E402
from vlmlab.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from vlmlab.models.idefics3 import Idefics3Config, Idefics3Net, image_prompt  # noqa: E402
from vlmlab.vision.tiling import TiledImageProcessor  # noqa: E402
from vlmlab.vision.vit import position_buckets  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(model_type="llama", hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SIZE, TILE = {"longest_edge": 64}, {"longest_edge": 32}
PER_TILE = 4  # (32 / 8 / 2) ** 2


def rgb(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


WIDE, TALL = rgb(100, 60, 1), rgb(40, 90, 2)  # 2 x 2 tiles + global view; 2 x 1 tiles + global view


def write_tokenizer(folder: Path) -> int:
    """The tiny byte-level tokenizer plus the special tokens of SmolVLM's; returns the vocab size."""
    from conftest import write_tiny_tokenizer
    from tokenizers import AddedToken, Tokenizer

    write_tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size()


def build(folder: Path, *, tie: bool = False, seed: int = 0, vision: dict | None = None, scale_factor: int = 2):
    """A random transformers Idefics3 model, its tokenizer and processor (PIL backend), saved to
    `folder` as transformers 5 saves them; returns (model, processor)."""
    vocab = write_tokenizer(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = transformers.Idefics3Config(vision_config=vision or VISION, text_config={**TEXT, "vocab_size": vocab},
                                      image_token_id=image_id, scale_factor=scale_factor, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    hf = transformers.Idefics3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0, so a misplaced one shows
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(folder)
    image_processor = transformers.Idefics3ImageProcessorPil(size=SIZE, max_image_size=TILE)
    processor = transformers.Idefics3Processor(image_processor, tok, image_seq_len=hf.model.image_seq_len)
    processor.save_pretrained(folder)
    return hf, processor


def load_net(folder: Path) -> Idefics3Net:
    net = Idefics3Net(Idefics3Config.from_hf(read_config(folder)))
    net.load_hf_tensors(*read_safetensors(folder))
    return net.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idefics3")
    hf, processor = build(folder)
    return folder, hf, processor, load_net(folder)


PROMPTS = {
    "text_only": (["<|im_start|>hello there"], None),
    "one_split_image": (["<|im_start|>look: <image>what is it?"], [[WIDE]]),
    "two_images": (["<image>first, then<image> second"], [[WIDE, TALL]]),
    "padded_batch": (["<image>two<image>images", "only <image> one, longer text here"], [[TALL, WIDE], [TALL]]),
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_logits_match_transformers(tiny, case):
    _, hf, processor, net = tiny
    text, images = PROMPTS[case]
    inputs = processor(text=text, images=images, padding=True, return_tensors="pt")
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    px = inputs.get("pixel_values")
    if case == "padded_batch":  # row 1 has one image: the processor pads it with all-zero tiles
        assert px.shape[:2] == (2, 8) and not px[1, 3:].any() and not mask.all()
    with torch.no_grad():
        ref = hf(**inputs).logits
        got = net(ids, px, attention_mask=mask if not mask.all() else None)
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-4, rtol=0)


def test_image_features_match_transformers(tiny):
    _, hf, processor, net = tiny
    px = processor(text=["<image><image>"], images=[[WIDE, TALL]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = torch.cat(list(hf.model.get_image_features(pixel_values=px).pooler_output))
        got = net.image_features(px)
    assert got.shape == (8, PER_TILE, TEXT["hidden_size"])
    torch.testing.assert_close(got.reshape(ref.shape), ref, atol=1e-5, rtol=0)


def test_positions_at_a_grid_where_transformers_repeats_ids(tmp_path):
    """Grid 25: transformers' float32 buckets give 0, 1, 2, 3, 4, 4, 6, ... (not 0..24); ours too,
    and at twice the trained size (50 x 50 patches) as well. Pixel shuffle by 5."""
    assert position_buckets(25, 25).tolist() != list(range(25))
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=50,
                  patch_size=2)
    hf, _ = build(tmp_path, vision=vision, scale_factor=5)
    net = load_net(tmp_path)
    for side in (50, 100):
        px = torch.randn(1, 2, 3, side, side, generator=torch.Generator().manual_seed(side))
        with torch.no_grad():
            ref = torch.cat(list(hf.model.get_image_features(pixel_values=px).pooler_output))
            got = net.image_features(px)
        torch.testing.assert_close(got.reshape(ref.shape), ref, atol=1e-5, rtol=0)


def test_pixel_shuffle_matches_transformers():
    shuffle = transformers.models.idefics3.modeling_idefics3.Idefics3Connector.pixel_shuffle
    for seq, dim, scale in ((64, 6, 2), (36, 5, 3), (16, 3, 1)):
        x = torch.randn(2, seq, dim)
        assert torch.equal(pixel_shuffle(x, scale), shuffle(None, x, scale))
    with pytest.raises(InputError, match="square grid .* 12 tokens"):
        pixel_shuffle(torch.zeros(1, 12, 4), 2)
    with pytest.raises(InputError, match="multiple of 2; got 9 tokens"):
        pixel_shuffle(torch.zeros(1, 9, 4), 2)


# ---- the processor: prompt ids and pixel values ----------------------------------------------------


def photo() -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.chelsea())  # 451 x 300


@pytest.mark.parametrize("splitting", [True, False])
def test_prompt_ids_and_pixels_equal_transformers_processor(tiny, splitting):
    folder, _, _, _ = tiny
    vlm = vlmlab.load(folder)
    images = [WIDE, photo(), TALL, rgb(20, 20, 3)]
    text = "<|im_start|>user\n<image>a cat<image>\n\nand <image><image> end<|im_end|>"
    ref_processor = transformers.Idefics3Processor(
        transformers.Idefics3ImageProcessorPil(size=SIZE, max_image_size=TILE, do_image_splitting=splitting),
        transformers.AutoTokenizer.from_pretrained(folder), image_seq_len=PER_TILE)
    ref = ref_processor(text=[text], images=[images], return_tensors="pt")
    vlm.processor.images.do_image_splitting = splitting
    ids, prefill = vlm._prepare([text], system=None, chat=False, images=[images])
    assert ids[0] == ref["input_ids"][0].tolist()
    px = ref["pixel_values"][0]
    assert torch.equal(prefill["pixel_values"], px[px.flatten(1).any(1)])
    assert len(prefill["pixel_values"]) == (5 + 5 + 3 + 5 if splitting else 4)


def test_image_prompt_text():
    assert image_prompt(0, 0, 2) == "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    assert image_prompt(1, 2, 1) == (
        "<fake_token_around_image><row_1_col_1><image><fake_token_around_image><row_1_col_2><image>\n"
        "\n<fake_token_around_image><global-img><image><fake_token_around_image>")


def test_tiling_config_round_trip_and_errors(tiny, tmp_path):
    folder = tiny[0]
    ours = TiledImageProcessor.from_folder(folder)  # transformers 5 nests it in processor_config.json
    written = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    assert ours.to_hf() == written and ours.tile == 32 and ours.resample == 1
    assert TiledImageProcessor.from_hf(ours.to_hf()) == ours
    ours.to_folder(tmp_path)  # preprocessor_config.json, as transformers 4.x wrote it
    assert TiledImageProcessor.from_folder(tmp_path) == ours
    assert TiledImageProcessor.from_folder(tmp_path / "nothing") is None
    with pytest.raises(ConfigError, match="x.json: image_processor_type 'CLIPImageProcessor' is not supported"):
        TiledImageProcessor.from_hf({"image_processor_type": "CLIPImageProcessor"}, source="x.json")
    with pytest.raises(ConfigError, match=r"field 'max_image_size' must be \{'longest_edge': n\}"):
        TiledImageProcessor.from_hf({"max_image_size": {"height": 32, "width": 32}})
    with pytest.raises(ConfigError, match="field 'do_image_splitting' must be true or false"):
        TiledImageProcessor(do_image_splitting="yes")


# ---- generation, loading, saving ----------------------------------------------------------------------


def test_ask_generates_what_transformers_generates(tiny):
    folder, hf, processor, _ = tiny
    vlm = vlmlab.load(folder)
    result = vlm.ask("what is here?", images=[WIDE], max_new_tokens=6, stop_token_ids=[])
    text = "<|im_start|>user\n<image>\nwhat is here?<|im_end|>\n<|im_start|>assistant\n"  # the tiny chat template
    inputs = processor(text=[text], images=[[WIDE]], return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(**inputs, do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    assert result.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_loading_is_strict(tiny):
    folder, _, _, net = tiny
    tensors, _ = read_safetensors(folder)
    other = Idefics3Net(Idefics3Config.from_hf(read_config(folder)))
    other.load_hf_tensors({**tensors, "model.text_model.rotary_emb.inv_freq": torch.ones(4)}, "old.safetensors")
    for k, v in net.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    proj = "model.connector.modality_projection.proj.weight"
    with pytest.raises(CheckpointError, match="missing tensor.*connector.projector.linear_1.weight"):
        other.load_hf_tensors({k: v for k, v in tensors.items() if k != proj}, "m.safetensors")
    with pytest.raises(CheckpointError, match="m.safetensors: unexpected tensor.*vision_model.head.probe"):
        other.load_hf_tensors({**tensors, "model.vision_model.head.probe": torch.zeros(1)}, "m.safetensors")


def test_tied_head(tmp_path):
    hf, processor = build(tmp_path, tie=True, seed=1)
    assert "lm_head.weight" not in read_safetensors(tmp_path)[0]
    net = load_net(tmp_path)
    assert net.language_model.lm_head.weight is net.language_model.model.embed_tokens.weight
    inputs = processor(text=["a <image> b"], images=[[TALL]], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(net(inputs["input_ids"], inputs["pixel_values"]), hf(**inputs).logits,
                                   atol=1e-4, rtol=0)
    assert "lm_head.weight" not in net.hf_state_dict()


def test_placeholder_count_mismatch_is_named(tiny):
    _, _, processor, net = tiny
    inputs = processor(text=["<image>x"], images=[[WIDE]], return_tensors="pt")
    ids, px = inputs["input_ids"], inputs["pixel_values"]
    short = ids[:, ids[0].tolist().index(net.cfg.image_token_id) + 1:]  # one placeholder fewer
    with pytest.raises(InputError, match=rf"5 image tile\(s\) give {5 * PER_TILE} features \({PER_TILE} each\) "
                                         rf"but the prompt has {5 * PER_TILE - 1} placeholder"):
        net(short, px)
    with pytest.raises(InputError, match=f"has {5 * PER_TILE} image placeholder tokens but no image was given"):
        net(ids)
    with pytest.raises(InputError, match="0 image tile"):  # only padding: no tiles at all
        net(ids, torch.zeros_like(px))


def test_only_padding_is_named_on_a_packed_network(tiny, monkeypatch):
    """Packed for inference (oneDNN, forced here in float32) the connector has no `.weight`;
    a batch of padding images still gets the named error, not an AttributeError."""
    from vlmlab.nn import packed

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this PyTorch build")
    _, _, processor, net = tiny
    net = copy.deepcopy(net)
    monkeypatch.setattr(packed, "onednn_packing_available", lambda dtype: True)
    assert packed.pack_for_inference(net)
    inputs = processor(text=["<image>x"], images=[[WIDE]], return_tensors="pt")
    with pytest.raises(InputError, match="0 image tile"):
        net(inputs["input_ids"], torch.zeros_like(inputs["pixel_values"]))


def test_a_generated_image_token_is_only_a_token(tiny):
    """After the prompt (cache filled), an image token the model writes is embedded as a token,
    as transformers does, not taken for a placeholder without its image."""
    _, hf, processor, net = tiny
    inputs = processor(text=["<image>x"], images=[[TALL]], return_tensors="pt")
    new = torch.tensor([[net.cfg.image_token_id]])
    cache = net.new_cache(inputs["input_ids"].shape[1] + 1)
    with torch.no_grad():
        net(inputs["input_ids"], inputs["pixel_values"], cache=cache)
        step = net(new, cache=cache)
        past = hf(**inputs, use_cache=True).cache
        ref = hf(input_ids=new, cache=past, use_cache=True).logits
    torch.testing.assert_close(step, ref, atol=1e-4, rtol=0)


def test_config_errors():
    hf = {"vision_config": VISION, "text_config": {**TEXT, "vocab_size": 50}, "scale_factor": 3}
    with pytest.raises(ConfigError, match="vision grid .* 4.* not a multiple of scale_factor 3"):
        Idefics3Config.from_hf(hf)
    with pytest.raises(ConfigError, match="scale_factor must be a positive integer"):
        Idefics3Config.from_hf({**hf, "scale_factor": 0})


def test_tokenizer_must_agree_with_config(tiny, tmp_path):
    import shutil

    folder = tiny[0]
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    write_json(tmp_path / "config.json", {**read_config(folder), "image_token_id": 5})
    with pytest.raises(ConfigError, match="tokenizer's <image> is token .* image_token_id is 5"):
        vlmlab.load(tmp_path)


def test_saved_folder_loads_in_transformers(tiny, tmp_path):
    folder, hf, _, net = tiny
    assert Idefics3Config.from_hf(net.cfg.to_hf()) == net.cfg
    vlm = vlmlab.load(folder)
    vlm.save(tmp_path)
    back = transformers.Idefics3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert processor.image_seq_len == PER_TILE and processor.image_processor.max_image_size == TILE
    inputs = processor(text=["see <image> and <image>"], images=[[WIDE, TALL]], return_tensors="pt")
    ids, prefill = vlm._prepare(["see <image> and <image>"], system=None, chat=False, images=[[WIDE, TALL]])
    assert ids[0] == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, hf(**inputs).logits, atol=1e-4, rtol=0)
    again = vlmlab.load(tmp_path)
    assert again.ask("what?", images=[TALL], max_new_tokens=4, stop_token_ids=[]).token_ids == \
        vlm.ask("what?", images=[TALL], max_new_tokens=4, stop_token_ids=[]).token_ids


SMOLVLM_TEMPLATE = (  # SmolVLM's own chat template: message content as a list of parts
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def test_chat_prompt_equals_transformers_processor_with_a_parts_template(tiny, tmp_path):
    """A checkpoint whose chat template takes content as parts (SmolVLM, llava-hf), shipped as
    chat_template.json: `ask`'s prompt ids equal transformers' apply_chat_template + processor."""
    import json
    import shutil

    folder, _, _, _ = tiny
    shutil.copytree(folder, tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "m" / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_TEMPLATE}))
    vlm = vlmlab.load(tmp_path / "m")
    images = [WIDE, TALL]
    messages = [{"role": "user", "content": "<image>What is this?<image> And that?"}]
    ids, _ = vlm._prepare([messages], system=None, chat=True, images=[images])
    ref_processor = transformers.Idefics3Processor(
        transformers.Idefics3ImageProcessorPil(size=SIZE, max_image_size=TILE),
        transformers.AutoTokenizer.from_pretrained(folder), image_seq_len=PER_TILE, chat_template=SMOLVLM_TEMPLATE)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"},
                                          {"type": "image"}, {"type": "text", "text": " And that?"}]}]
    text = ref_processor.apply_chat_template(parts, add_generation_prompt=True)
    assert text.endswith("User:<image>What is this?<image> And that?<end_of_utterance>\nAssistant:")
    ref = ref_processor(text=[text], images=[images], return_tensors="pt")
    assert ids[0] == ref["input_ids"][0].tolist()
    # text-only prompts keep their text with such a template
    ids, _ = vlm._prepare(["Hello there"], system=None, chat=True, images=None)
    assert vlm.tokenizer.decode(ids[0]) == "<|im_start|>User: Hello there<end_of_utterance>\nAssistant:"


def test_a_recipe_trains_idefics3(tiny, tmp_path):
    """Training is family-agnostic: labels cover only the answer (the masked prefix is exactly
    the prompt `ask` builds: tiles, tags and placeholders), and a recipe stage on a SmolVLM
    folder trains the connector alone; the result loads in transformers with the same logits."""
    import shutil

    from vlmlab.train.vlm import IGNORE_INDEX, chat_tokens, train_recipe

    folder = tmp_path / "m"
    shutil.copytree(tiny[0], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_TEMPLATE}))
    vlm = vlmlab.load(folder)
    messages = [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "noise"}]
    _, image_ids = vlm.image_inputs([WIDE])
    ids, labels = chat_tokens(vlm.tokenizer, messages, image_ids=image_ids)
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert ids[:first] == vlm.prepare(messages[:1], [WIDE])[0]
    assert vlm.tokenizer.decode(labels[first:]) == " noise<end_of_utterance>\n"

    recipe = {"name": "micro-smolvlm", "model": {"from": str(folder)}, "stages": [{
        "name": "connector", "steps": 3, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "save_every": 3,
        "log_every": 1, "param_groups": {"": 0.0, "connector": 1e-2},
        "data": {"source": "scenes", "tasks": "color", "scene": {"width": 48, "height": 40, "max_objects": 2}}}]}
    trained = train_recipe(recipe, tmp_path / "run", progress=False)
    before, after = vlm.net.state_dict(), trained.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("connector.") for k in changed), changed
    hf = transformers.Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "run" / "model").eval()
    processor = transformers.Idefics3Processor.from_pretrained(tmp_path / "run" / "model")
    inputs = processor(text=["<image>what?"], images=[[WIDE]], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(trained.net(inputs["input_ids"], inputs["pixel_values"]), hf(**inputs).logits,
                                   atol=1e-4, rtol=0)
