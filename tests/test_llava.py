"""LLaVA against transformers' LlavaForConditionalGeneration on tiny random configs: logits with
images spliced in (CLIP and SigLIP towers, one or several feature layers, with and without the
[class] token), every on-disk key layout, the placeholder count check, and saving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmlab.checkpoints.hf import read_config, read_safetensors, write_json, write_safetensors  # noqa: E402
from vlmlab.connectors.projector import Projector, parse_projector  # noqa: E402
from vlmlab.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from vlmlab.models.llava import LlavaConfig, LlavaNet  # noqa: E402

IMAGE = 119
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(model_type="llama", vocab_size=120, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CASES = {
    "clip_default": dict(tower="clip_vision_model", layer=-2, strategy="default"),
    "clip_full_two_layers": dict(tower="clip_vision_model", layer=[-3, -1], strategy="full"),
    "siglip_full": dict(tower="siglip_vision_model", layer=-1, strategy="full"),
}


def build(case: str, folder: Path, seed: int = 0, tie: bool = False):
    c = CASES[case]
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(
        vision_config={**VISION, "model_type": c["tower"]}, text_config={**TEXT, "tie_word_embeddings": tie},
        image_token_id=IMAGE, vision_feature_layer=c["layer"], vision_feature_select_strategy=c["strategy"],
        projector_hidden_act="gelu", tie_word_embeddings=tie)
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(folder)
    return hf


def load(folder: Path) -> LlavaNet:
    net = LlavaNet(LlavaConfig.from_hf(read_config(folder)))
    tensors, origin = read_safetensors(folder)
    net.load_hf_tensors(tensors, origin)
    return net.eval()


def prompt(per_image: int, images: int = 2) -> torch.Tensor:
    """Text, image placeholders, text, image placeholders, text (two rows, the second shifted)."""
    rows = []
    for shift in (0, 3):
        ids = [1, 5 + shift, 9]
        for _ in range(images):
            ids += [IMAGE] * per_image + [11, 12 + shift]
        rows.append(ids)
    return torch.tensor(rows)


def per_image(case: str) -> int:
    grid = (VISION["image_size"] // VISION["patch_size"]) ** 2
    has_cls = CASES[case]["tower"] == "clip_vision_model"
    return grid + int(has_cls and CASES[case]["strategy"] == "full")


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, build(request.param, folder), load(folder), folder


def test_logits_match_transformers(pair):
    case, hf, net, _ = pair
    ids = prompt(per_image(case))
    px = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 2 rows x 2 images
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
        got = net(ids, px)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    with torch.no_grad():  # and the image features alone
        ref_feats = hf.model.get_image_features(pixel_values=px)
        ref_feats = getattr(ref_feats, "pooler_output", ref_feats)
        ref_feats = torch.cat(list(ref_feats)) if isinstance(ref_feats, (list, tuple)) else ref_feats
        torch.testing.assert_close(net.image_features(px).reshape(ref_feats.shape), ref_feats, atol=1e-4, rtol=0)


def test_text_only_prompts_work(pair):
    _, hf, net, _ = pair
    ids = torch.tensor([[1, 5, 9, 22, 40]])
    with torch.no_grad():
        torch.testing.assert_close(net(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_placeholder_count_mismatch_is_named(pair):
    case, _, net, _ = pair
    n = per_image(case)
    ids = prompt(n)[:, :-1]
    ids[0, 3] = 50  # one placeholder fewer in row 0
    with pytest.raises(InputError, match=rf"{4 * n} features .* {4 * n - 1} placeholder"):
        net(ids, torch.zeros(4, 3, 32, 32))
    with pytest.raises(InputError, match="no image was given"):
        net(prompt(n))


@pytest.mark.parametrize("layout", ["transformers_4_52", "transformers_4_early"])
def test_other_key_layouts_load(pair, layout, tmp_path):
    case, _, net, folder = pair
    tensors, _ = read_safetensors(folder)
    moved = {}
    for k, v in tensors.items():
        if layout == "transformers_4_52":
            k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
            k = k.replace("vision_tower.", "model.vision_tower.vision_model.").replace("multi_modal_projector.", "model.multi_modal_projector.")
        else:
            k = k.replace("vision_tower.", "vision_tower.vision_model.")
        moved[k] = v
    moved["vision_tower.vision_model.embeddings.position_ids" if layout != "transformers_4_52"
          else "model.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(16)[None]
    other = LlavaNet(LlavaConfig.from_hf(read_config(folder)))
    other.load_hf_tensors(moved, "old.safetensors")
    for k, v in net.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    with pytest.raises(CheckpointError, match="multi_modal_projector.linear_2"):
        other.load_hf_tensors({k: v for k, v in moved.items() if "linear_2.weight" not in k}, "m.safetensors")


def test_saved_folder_loads_in_transformers(pair, tmp_path):
    case, hf, net, _ = pair
    write_json(tmp_path / "config.json", net.cfg.to_hf())
    write_safetensors(tmp_path / "model.safetensors", net.hf_state_dict())
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, px = prompt(per_image(case)), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=px).logits,
                                   hf(input_ids=ids, pixel_values=px).logits, atol=1e-4, rtol=0)


def test_tied_embeddings(tmp_path):
    hf = build("clip_default", tmp_path, tie=True)
    net = load(tmp_path)
    assert net.language_model.lm_head.weight is net.language_model.model.embed_tokens.weight
    ids = prompt(per_image("clip_default"))
    px = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(ids, px), hf(input_ids=ids, pixel_values=px).logits, atol=1e-4, rtol=0)


def test_projector_strings():
    assert parse_projector("linear") == (1, None) and parse_projector("mlp3x_silu") == (3, "silu")
    p = Projector("mlp3x_gelu", 8, 4)
    assert [n for n, _ in p.named_children()] == ["linear_1", "linear_2", "linear_3"]
    assert p(torch.zeros(2, 8)).shape == (2, 4)
    assert Projector("linear", 8, 4).linear_1.in_features == 8
    for bad in ("mlp", "mlp2x_nope", "conv", "mlp0x_gelu"):
        with pytest.raises(ConfigError, match="projector"):
            parse_projector(bad)


# ---- the runtime: vlmlab.load + ask -------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    from conftest import TINY_VOCAB, write_tiny_tokenizer
    from tokenizers import AddedToken, Tokenizer

    from vlmlab.vision.preprocess import ImageProcessor

    folder = tmp_path_factory.mktemp("vlm")
    image_id = TINY_VOCAB  # "<image>" added after the tiny tokenizer's 259 tokens
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        vision_config={**VISION, "model_type": "clip_vision_model"},
        text_config={**TEXT, "vocab_size": TINY_VOCAB + 1, "eos_token_id": 2, "bos_token_id": 1},
        image_token_id=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default")
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(folder)
    write_tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    ImageProcessor.clip(32).to_folder(folder)
    return folder, hf, image_id


def test_ask_generates_what_transformers_generates(vlm_folder, tmp_path):
    import numpy as np
    from PIL import Image

    import vlmlab

    folder, hf, image_id = vlm_folder
    vlm = vlmlab.load(folder)
    assert vlm.kind == "vision-language-model"
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)) for i in range(2)]
    result = vlm.ask("what is here?", images=images, max_new_tokens=8, stop_token_ids=[])
    # what ask() does: the ids and pixels of its first forward
    ids, prefill = vlm._prepare(["<image><image>\nwhat is here?"], system=None, chat=True, images=[images])
    assert ids[0].count(image_id) == 2 * 16 and prefill["pixel_values"].shape == (2, 3, 32, 32)
    x = torch.tensor(ids)
    with torch.no_grad():
        ref = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=prefill["pixel_values"],
                          do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    assert result.token_ids == ref[0, x.shape[1]:].tolist()
    text_only = vlm.generate("hello", max_new_tokens=4, stop_token_ids=[])
    assert len(text_only.token_ids) == 4
    with pytest.raises(InputError, match="1 <image> marker"):
        vlm.ask("<image> two pictures?", images=images)
    vlm.save(tmp_path / "saved")
    again = vlmlab.load(tmp_path / "saved")
    assert again.ask("what is here?", images=images, max_new_tokens=8, stop_token_ids=[]).token_ids == result.token_ids


def test_pixel_shuffle_folds_patch_features(vlm_folder, tmp_path):
    """pixel_shuffle=2: every 2x2 block of patch features becomes one token (a 4x4 grid -> 4
    tokens per image), the projector reads 4x wider features, prompts get 4 placeholders per
    image, and the setting survives save/load (config.json's vlmlab_pixel_shuffle)."""
    import dataclasses

    import numpy as np
    from PIL import Image

    import vlmlab
    from vlmlab.checkpoints.hf import read_config
    from vlmlab.connectors.pixel_shuffle import pixel_shuffle
    from vlmlab.infer.explain import explain
    from vlmlab.infer.vlm import VisionLanguageModel

    folder, _, image_id = vlm_folder
    base = vlmlab.load(folder)
    cfg = dataclasses.replace(base.net.cfg, pixel_shuffle=2, image_seq_length=None)
    assert cfg.image_seq_length == 4 and cfg.patch_size_in_features == 16
    torch.manual_seed(1)
    net = LlavaNet(cfg).eval()
    assert net.multi_modal_projector.linear_1.in_features == 4 * VISION["hidden_size"]
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        patches = net.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]  # (2, 16, 32)
        folded = pixel_shuffle(patches, 2)
        # token (0, 0) = patches (0, 0), (0, 1), (1, 0), (1, 1) of the 4x4 grid, in that order
        assert torch.equal(folded[:, 0], torch.cat([patches[:, i] for i in (0, 1, 4, 5)], -1))
        torch.testing.assert_close(net.image_features(px), net.multi_modal_projector(folded))
    vlm = VisionLanguageModel(net, base.tokenizer, base.processor, name="shuffled")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)) for i in range(2)]
    ids, prefill = vlm._prepare(["<image><image>\nwhat is here?"], system=None, chat=True, images=[images])
    assert ids[0].count(image_id) == 2 * 4
    result = vlm.ask("what is here?", images=images, max_new_tokens=6, stop_token_ids=[])
    vlm.save(tmp_path / "saved")
    assert read_config(tmp_path / "saved")["vlmlab_pixel_shuffle"] == 2
    again = vlmlab.load(tmp_path / "saved")
    assert again.net.cfg.pixel_shuffle == 2
    assert again.ask("what is here?", images=images, max_new_tokens=6, stop_token_ids=[]).token_ids == result.token_ids
    assert explain(vlm, "what is here?", images[0], max_new_tokens=2, stop_token_ids=[]).heat.shape == (2, 2)
    for bad, match in ((3, "multiple of 3"), (0, "positive integer"), (True, "positive integer")):
        with pytest.raises(ConfigError, match=match):
            dataclasses.replace(cfg, pixel_shuffle=bad, image_seq_length=None)
    with pytest.raises(ConfigError, match=r"\[class\] token"):
        dataclasses.replace(cfg, vision_feature_select_strategy="full")


def _saved_and_needed(vlm, tmp_path, field: str, kept: str, removed: str) -> None:
    """A vlmlab extension of the LLaVA layout survives save + load: config.json says `field`, the
    tensor `kept` comes back equal, the reloaded model answers with the same tokens; and a folder
    without the tensor `removed` is refused by name."""
    import numpy as np
    from PIL import Image

    import vlmlab

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    result = vlm.ask("what is here?", images=[image], max_new_tokens=6, stop_token_ids=[])
    vlm.save(tmp_path / "saved")
    assert read_config(tmp_path / "saved")[field] is True
    again = vlmlab.load(tmp_path / "saved")
    assert torch.equal(again.net.state_dict()[kept], vlm.net.state_dict()[kept])
    assert again.ask("what is here?", images=[image], max_new_tokens=6, stop_token_ids=[]).token_ids == result.token_ids
    tensors, _ = read_safetensors(tmp_path / "saved")
    tensors.pop(removed)
    write_safetensors(tmp_path / "saved" / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=removed):
        vlmlab.load(tmp_path / "saved")


def test_feature_norm_standardises_the_projector_input(vlm_folder, tmp_path):
    """feature_norm: the projector reads (x - mean) / std of its inputs, with statistics measured
    by calibrate_feature_norm on sample images (each channel then has mean 0, std 1 over them),
    saved as buffers and config.json's vlmlab_feature_norm; a folder missing them is refused."""
    import dataclasses

    import vlmlab
    from vlmlab.infer.vlm import VisionLanguageModel

    folder, _, _ = vlm_folder
    base = vlmlab.load(folder)
    cfg = dataclasses.replace(base.net.cfg, feature_norm=True)
    torch.manual_seed(1)
    net = LlavaNet(cfg).eval()
    px = torch.randn(6, 3, 32, 32)
    inputs = net.projector_inputs(px)
    with torch.no_grad():  # new: the identity
        torch.testing.assert_close(net.image_features(px), net.multi_modal_projector(inputs))
    net.calibrate_feature_norm(px)
    standard = (inputs - net.feature_norm.mean) / net.feature_norm.std
    flat = standard.reshape(-1, standard.shape[-1])
    torch.testing.assert_close(flat.mean(0), torch.zeros(flat.shape[-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.ones(flat.shape[-1]), atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(net.image_features(px), net.multi_modal_projector(standard))
    _saved_and_needed(VisionLanguageModel(net, base.tokenizer, base.processor, name="standardised"), tmp_path,
                      "vlmlab_feature_norm", "feature_norm.std", "feature_norm.mean")
    with pytest.raises(ConfigError, match="feature_norm"):
        dataclasses.replace(cfg, feature_norm="yes")
    with pytest.raises(ConfigError, match="no feature_norm"):
        base.net.calibrate_feature_norm(px)


def test_image_positions_add_a_row_and_a_column_embedding(vlm_folder, tmp_path):
    """image_positions: each projected image token gets rows[r] + columns[c] of its place on the
    (pixel-shuffled) grid, tokens in raster order; new, they are zeros (the model unchanged);
    saved as parameters and config.json's vlmlab_image_positions, learnt by gradient; a folder
    missing them is refused, and a model whose tokens are not a grid cannot have them."""
    import dataclasses

    import vlmlab
    from vlmlab.infer.vlm import VisionLanguageModel

    folder, _, _ = vlm_folder
    base = vlmlab.load(folder)
    cfg = dataclasses.replace(base.net.cfg, image_positions=True)
    torch.manual_seed(1)
    net = LlavaNet(cfg).eval()
    net.load_state_dict({**base.net.state_dict(), **dict(net.image_positions.named_parameters(prefix="image_positions"))})
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # new: the identity
        torch.testing.assert_close(net.image_features(px), base.net.image_features(px))
    side = cfg.vision.grid // cfg.pixel_shuffle
    assert net.image_positions.rows.shape == net.image_positions.columns.shape == (side, cfg.text.hidden_size)
    net.image_features(px).sum().backward()  # every token reaches its row's and its column's embedding
    torch.testing.assert_close(net.image_positions.rows.grad, torch.full_like(net.image_positions.rows, 3.0 * side))
    with torch.no_grad():
        net.image_positions.rows.normal_()
        net.image_positions.columns.normal_()
        moved = net.image_features(px) - base.net.image_features(px)
    for r in range(side):
        for c in range(side):
            torch.testing.assert_close(moved[:, r * side + c],
                                       (net.image_positions.rows[r] + net.image_positions.columns[c]).expand(3, -1))
    _saved_and_needed(VisionLanguageModel(net, base.tokenizer, base.processor, name="placed"), tmp_path,
                      "vlmlab_image_positions", "image_positions.columns", "image_positions.rows")
    with pytest.raises(ConfigError, match="image_positions"):
        dataclasses.replace(cfg, image_positions=1)
    with pytest.raises(ConfigError, match="grid"):
        dataclasses.replace(cfg, vision_feature_select_strategy="full")
