"""Embedding towers compute only what pooling reads: the last layer at the pooled position
(`keep`), causal texts in length groups cut after their end-of-text token, and quick_gelu's fused
gradient. Each must give the numbers (and gradients) of the full computation."""

import itertools

import pytest
import torch

from vlmlab.nn.encoder import Encoder, EncoderLayer, length_groups, padding_mask
from vlmlab.nn.mlp import quick_gelu
from vlmlab.text.text_encoder import TextEncoderConfig, TextTransformer
from vlmlab.vision.vit import ViTConfig, VisionTransformer


def _padded_mask(lengths, n):
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, False), (True, True)])
def test_last_layer_at_kept_positions_equals_the_full_layer(norm_first, causal, padded):
    torch.manual_seed(0)
    layer = EncoderLayer(32, 4, 64, norm_first=norm_first).eval()
    x = torch.randn(3, 9, 32)
    mask, is_causal = padding_mask(_padded_mask([9, 4, 6], 9) if padded else None, causal)
    keep = torch.tensor([[0, 3], [3, 1], [5, 5]])  # per-row positions, repeats allowed
    full = layer(x, mask, is_causal)
    kept = layer(x, mask, is_causal, keep)
    assert kept.shape == (3, 2, 32)
    torch.testing.assert_close(kept, full.gather(1, keep[..., None].expand(-1, -1, 32)), rtol=0, atol=1e-6)


def test_keep_applies_to_the_last_layer_run_only():
    torch.manual_seed(0)
    enc = Encoder(3, 16, 2, 32).eval()
    x = torch.randn(2, 5, 16)
    keep = torch.tensor([[4], [2]])
    torch.testing.assert_close(enc(x, keep=keep)[:, 0], enc(x)[[0, 1], [4, 2]], rtol=0, atol=1e-6)
    torch.testing.assert_close(enc(x, num_layers=2, keep=keep)[:, 0], enc(x, num_layers=2)[[0, 1], [4, 2]],
                               rtol=0, atol=1e-6)


def _brute_force_cost(lengths, overhead):
    ordered = sorted(lengths)
    best = float("inf")
    for k in range(len(ordered)):
        for cuts in itertools.combinations(range(1, len(ordered)), k):
            bounds = (0, *cuts, len(ordered))
            best = min(best, sum((b - a) * ordered[b - 1] + overhead for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("overhead", [0, 5, 64, 10_000])
def test_length_groups_partition_the_batch_at_least_cost(overhead):
    gen = torch.Generator().manual_seed(overhead)
    for _ in range(20):
        lengths = torch.randint(1, 30, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen)
        groups = length_groups(lengths, overhead)
        rows = torch.cat([r for r, _ in groups]).tolist()
        assert sorted(rows) == list(range(len(lengths)))  # every row exactly once
        assert all(n == int(lengths[r].max()) for r, n in groups)  # each cut to its longest row
        cost = sum(len(r) * n + overhead for r, n in groups)
        assert cost == _brute_force_cost(lengths.tolist(), overhead)
    assert len(length_groups(torch.tensor([7, 7, 7]), 0)) == 1
    assert len(length_groups(torch.tensor([2, 50]), 10_000)) == 1
    assert [n for _, n in length_groups(torch.tensor([2, 50]), 0)] == [2, 50]


TEXT_CASES = {
    "clip": dict(causal=True, pooling="eos", eos_token_id=99),
    "clip-legacy-eos": dict(causal=True, pooling="eos", eos_token_id=2),
    "siglip": dict(causal=False, pooling="last", eos_token_id=None, projection_size=24),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
@pytest.mark.parametrize("with_mask", [True, False])
def test_text_pool_equals_forward_with_gradients(case, with_mask):
    torch.manual_seed(0)
    cfg = TextEncoderConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=24, hidden_act="quick_gelu",
                            **TEXT_CASES[case])
    tower = TextTransformer(cfg)
    lengths = [3, 24, 5, 9, 12, 1, 17, 9, 2, 20]
    ids = torch.randint(3, 98, (len(lengths), 24))
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 99  # end-of-text (also the highest id, for the legacy rule)
        ids[row, n:] = 0
    mask = _padded_mask(lengths, 24) if with_mask else None
    if cfg.causal:  # the length groups are really used
        assert len(length_groups(tower.pooled_positions(ids) + 1)) > 1
    weights = torch.randn(len(lengths), tower.pool(ids, mask).shape[-1])

    def run(fn):
        tower.zero_grad()
        out = fn()
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in tower.parameters()]

    pooled, grads = run(lambda: tower.pool(ids, mask))
    ref, ref_grads = run(lambda: tower(ids, mask)[1])
    torch.testing.assert_close(pooled, ref, rtol=0, atol=2e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean", "map"])
def test_vision_pool_equals_forward(pooling):
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=32, patch_size=8, class_token=pooling != "map", pre_norm=True,
                                      pooling=pooling))
    pixels = torch.randn(3, 3, 32, 48)  # a non-square grid, positions interpolated
    torch.testing.assert_close(vit.pool(pixels), vit(pixels).pooled, rtol=0, atol=1e-6)
    vit.pool(pixels).sum().backward()
    assert all(p.grad is not None for p in vit.parameters())


def test_quick_gelu_is_transformers_formula_with_a_fused_exact_gradient():
    x = torch.randn(10_000) * 4
    assert torch.equal(quick_gelu(x), x * torch.sigmoid(1.702 * x))  # the same float32 bits
    x64 = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(quick_gelu, (x64,))
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(quick_gelu(xr).sum(), xr)
    (ref,) = torch.autograd.grad((xr * torch.sigmoid(1.702 * xr)).sum(), xr)
    torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-6)
