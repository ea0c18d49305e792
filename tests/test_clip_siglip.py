"""CLIP and SigLIP against transformers on tiny random configs: embeddings and logits (float32,
1e-4), non-square images with interpolated positions, any layer's hidden states, the legacy
end-of-text pooling and checkpoint layout, strict loading, and saving in HF layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmlab.checkpoints.hf import read_config, read_safetensors, write_json, write_safetensors  # noqa: E402
from vlmlab.errors import CheckpointError, InputError  # noqa: E402
from vlmlab.models.clip import CLIPConfig, CLIPNet  # noqa: E402
from vlmlab.models.siglip import SiglipConfig, SiglipNet  # noqa: E402

ATOL = 1e-4
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=20)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
EOS = 98
FAMILIES = {
    "clip": (transformers.CLIPConfig, transformers.CLIPModel, CLIPConfig, CLIPNet),
    "siglip": (transformers.SiglipConfig, transformers.SiglipModel, SiglipConfig, SiglipNet),
}


def build(family: str, folder: Path, eos: int = EOS, seed: int = 0, vocab_size: int = TEXT["vocab_size"]):
    hf_cfg_cls, hf_cls, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    text = {**TEXT, "vocab_size": vocab_size}
    if family == "clip":
        text["eos_token_id"] = eos
    extra = {"projection_dim": 16} if family == "clip" else {}
    hf = hf_cls(hf_cfg_cls(text_config=text, vision_config=dict(VISION), **extra)).eval()
    with torch.no_grad():  # SigLIP initialises the scale and bias at 0; make them matter
        hf.logit_scale.fill_(1.3)
        if family == "siglip":
            hf.logit_bias.fill_(-0.7)
    hf.save_pretrained(folder)
    return hf


def load(family: str, folder: Path):
    _, _, cfg_cls, net_cls = FAMILIES[family]
    net = net_cls(cfg_cls.from_hf(read_config(folder)))
    tensors, origin = read_safetensors(folder)
    net.load_hf_tensors(tensors, origin)
    return net.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, folder)
    return request.param, hf, load(request.param, folder), folder


def text_batch(family: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, EOS - 1, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    if family == "clip":  # right padded, the end-of-text token before the padding
        for row, n in enumerate((11, 7, 4)):
            ids[row, n - 1] = EOS
            mask[row, n:] = 0
            ids[row, n:] = 0
    return ids, mask


def features(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


def test_logits_and_embeddings_match(pair):
    family, hf, net, _ = pair
    ids, mask = text_batch(family)
    px = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask if family == "clip" else None, pixel_values=px)
        img, txt = net.encode_image(px), net.encode_text(ids, mask if family == "clip" else None)
        torch.testing.assert_close(img, features(hf.get_image_features(pixel_values=px)), atol=ATOL, rtol=0)
        torch.testing.assert_close(net.logits(img, txt), ref.logits_per_image, atol=ATOL, rtol=0)
    assert ref.logits_per_image.shape == (4, 3)


@pytest.mark.parametrize("size", [(48, 24), (24, 40), (64, 64)])
def test_other_image_sizes_interpolate_positions(pair, size):
    family, hf, net, _ = pair
    px = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = features(hf.get_image_features(pixel_values=px, interpolate_pos_encoding=True))
        torch.testing.assert_close(net.encode_image(px), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [0, 1, -2, -1])
def test_any_layer_hidden_states_match(pair, layer):
    family, hf, net, _ = pair
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[layer]
        torch.testing.assert_close(net.vision_model.feature_layer(px, layer), ref, atol=ATOL, rtol=0)
        mine = net.vision_model(px, output_hidden_states=True).hidden_states
        assert len(mine) == VISION["num_hidden_layers"] + 1
        torch.testing.assert_close(mine[layer], ref, atol=ATOL, rtol=0)


def test_clip_legacy_eos_pooling_takes_the_highest_id(tmp_path):
    hf = build("clip", tmp_path, eos=2)
    net = load("clip", tmp_path)
    ids = torch.tensor([[5, 97, 9, 3, 0, 0], [96, 4, 2, 8, 1, 1]])  # highest ids at 1 and 0; id 2 elsewhere
    with torch.no_grad():
        ref = features(hf.get_text_features(input_ids=ids))
        torch.testing.assert_close(net.encode_text(ids), ref, atol=ATOL, rtol=0)
        pooled = net.text_model(ids)[1]
        hidden = net.text_model(ids)[0]
        torch.testing.assert_close(pooled, hidden[[0, 1], [1, 0]])


def test_legacy_position_id_buffers_are_ignored_and_strictness_kept(pair, tmp_path):
    family, hf, net, folder = pair
    tensors, _ = read_safetensors(folder)
    legacy = dict(tensors)
    legacy["text_model.embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    legacy["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    fresh = FAMILIES[family][3](FAMILIES[family][2].from_hf(read_config(folder)))
    fresh.load_hf_tensors(legacy, "legacy.safetensors")
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    missing = {k: v for k, v in tensors.items() if "layer_norm2" not in k or ".1." not in k}
    with pytest.raises(CheckpointError, match="layer_norm2"):
        fresh.load_hf_tensors(missing, "m.safetensors")
    with pytest.raises(CheckpointError, match="surprise"):
        fresh.load_hf_tensors({**tensors, "vision_model.surprise": torch.zeros(1)}, "u.safetensors")


def test_saved_folder_loads_in_transformers(pair, tmp_path):
    family, hf, net, _ = pair
    cfg = net.cfg.to_hf()
    write_json(tmp_path / "config.json", cfg)
    write_safetensors(tmp_path / "model.safetensors", net.hf_state_dict())
    back = FAMILIES[family][1].from_pretrained(tmp_path).eval()
    ids, mask = text_batch(family)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = back(input_ids=ids, pixel_values=px).logits_per_image
        b = hf(input_ids=ids, pixel_values=px).logits_per_image
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_bad_pixel_shapes_are_named(pair):
    _, _, net, _ = pair
    with pytest.raises(InputError, match="patch size"):
        net.encode_image(torch.zeros(1, 3, 30, 32))
    with pytest.raises(InputError, match="batch, 3, height, width"):
        net.encode_image(torch.zeros(3, 32, 32))
    with pytest.raises(InputError, match="longer than"):
        net.encode_text(torch.zeros(1, 21, dtype=torch.long))
