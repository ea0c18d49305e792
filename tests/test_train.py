"""Training: the contrastive losses against direct computations, gradients to both towers and the
temperature, freezing, exact kill-and-resume, 2-process torchrun = 1 process, checkpoint errors,
and a short LiT run on the scenes that learns."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vlmlab.errors import CheckpointError, ConfigError
from vlmlab.hardware import fast_bfloat16
from vlmlab.train.losses import ContrastiveLoss, clamp_logit_scale
from vlmlab.train.trainer import CHECKPOINT, METRICS, TrainConfig, read_metrics

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from launch import assert_same_training, run_helper  # noqa: E402
from tiny_clip_train import make_trainer, tiny_clip  # noqa: E402


def test_infonce_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    scale = torch.tensor(2.0)
    got = ContrastiveLoss("infonce")(img, txt, scale)
    a = img / img.norm(dim=-1, keepdim=True)
    b = txt / txt.norm(dim=-1, keepdim=True)
    logits = math.exp(2.0) * a @ b.T
    i2t = -sum(logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(5)) / 5
    t2i = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(5)) / 5
    torch.testing.assert_close(got, (i2t + t2i) / 2)


def test_sigmoid_equals_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    scale, bias = torch.tensor(1.5), torch.tensor(-2.0)
    got = ContrastiveLoss("sigmoid")(img, txt, scale, bias)
    a, b = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (math.exp(1.5) * float(a[i] @ b[j]) - 2.0))))
    assert got.item() == pytest.approx(total / 4, rel=1e-5)


def test_gradients_reach_both_towers_and_the_temperature():
    net = tiny_clip()
    pixels, ids = torch.randn(4, 3, 16, 16), torch.tensor([[1, 5, 31, 0]] * 2 + [[1, 7, 9, 31]] * 2)
    img, txt = net(pixels, ids, features=True)
    ContrastiveLoss("infonce")(img, txt, net.logit_scale).backward()
    for name in ("vision_model.embeddings.patch_embedding.weight", "text_model.embeddings.token_embedding.weight",
                 "visual_projection.weight", "text_projection.weight", "logit_scale"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_logit_scale_is_clamped_as_clip_does():
    p = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale(p)
    assert p.item() == pytest.approx(math.log(100))


def test_freezing_by_learning_rate_zero(tmp_path):
    trainer = make_trainer(tmp_path, steps=2)
    trainer.cfg.param_groups = {"text_model": 0.0, "visual_projection": 5e-4}
    named = trainer._trainable()
    assert not any(n.startswith("text_model.") for n in named)
    assert named["visual_projection.weight"][1] == 5e-4 and named["logit_scale"][1] == trainer.cfg.lr
    assert not trainer.model.text_model.embeddings.token_embedding.weight.requires_grad


def _losses(path: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r.get("grad_norm")) for r in read_metrics(path)]


def test_kill_and_resume_continues_exactly(tmp_path):
    straight = make_trainer(tmp_path / "a", steps=6)
    straight.fit(progress=False)
    with pytest.raises(KeyboardInterrupt):  # killed during step 5 (the last checkpoint is step 4)
        make_trainer(tmp_path / "b", steps=6, crash_at=4).fit(progress=False)
    assert load_file(tmp_path / "b" / CHECKPOINT)  # readable: written atomically
    resumed = make_trainer(tmp_path / "b", steps=6)
    resumed.fit(resume=True, progress=False)
    assert resumed.step == 6
    assert _losses(tmp_path / "a" / METRICS) == _losses(tmp_path / "b" / METRICS)
    for (k, v), (_, w) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(v, w), k


def test_bf16_autocast_trains_float32_weights(tmp_path):
    """precision bf16: the forward runs in bfloat16 (autocast), the weights and optimizer stay
    float32, and the run differs from the fp32 one only by rounding (tiny model: fast on any CPU)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(tmp_path / precision, steps=3)
        trainer.cfg.precision = precision
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.fit(progress=False)
        after = trainer.model.state_dict()
        assert all(v.dtype == torch.float32 for v in after.values())
        assert not torch.equal(before["visual_projection.weight"], after["visual_projection.weight"])
        runs[precision] = (read_metrics(tmp_path / precision / METRICS), after)
    (m32, w32), (m16, w16) = runs["fp32"], runs["bf16"]
    assert [r["loss"] for r in m16] != [r["loss"] for r in m32]  # bfloat16 really ran
    for a, b in zip(m32, m16):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05, abs=0.02)
    for k in w32:
        torch.testing.assert_close(w16[k], w32[k], rtol=0.05, atol=0.02, msg=k)


def test_auto_precision_picks_bf16_only_where_the_device_has_it(tmp_path, monkeypatch):
    import vlmlab.train.trainer as trainer_module

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(trainer_module, "fast_bfloat16", lambda device, native=native: native)
        cfg = TrainConfig(steps=1, batch_size=8, precision="auto")
        trainer_module.Trainer(tiny_clip(), lambda m, batch: None, lambda *where: None, cfg, tmp_path / expected)
        assert cfg.precision == expected  # resolved once, for the run (and its checkpoint's record)
    with pytest.raises(ConfigError, match="'fp32', 'bf16' or 'auto'"):
        TrainConfig(steps=1, batch_size=1, precision="fp16")


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    one = make_trainer(tmp_path / "one", steps=2, grad_accum=1, batch_size=8)
    two = make_trainer(tmp_path / "two", steps=2, grad_accum=2, batch_size=8)
    one.fit(progress=False)
    two.fit(progress=False)
    # InfoNCE over 8 is not the mean of two InfoNCEs over 4: the runs differ, but both train
    assert read_metrics(tmp_path / "two" / METRICS)[0]["loss"] != read_metrics(tmp_path / "one" / METRICS)[0]["loss"]
    assert two.micro_batch == 4 and one.micro_batch == 8


def test_resume_errors_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        make_trainer(tmp_path / "none", steps=2).fit(resume=True, progress=False)
    make_trainer(tmp_path / "c", steps=2).fit(progress=False)
    path = tmp_path / "c" / CHECKPOINT
    path.write_bytes(path.read_bytes()[: 200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        make_trainer(tmp_path / "c", steps=4).fit(resume=True, progress=False)
    with pytest.raises(ConfigError, match="divisible"):
        make_trainer(tmp_path / "d", steps=2, grad_accum=3, batch_size=8)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("patch_keep", ["1.0", "0.5"])
def test_two_process_torchrun_equals_one_process(tmp_path, patch_keep):
    """Also with FLIP's patch dropping: each sample's patches depend on its index, not its rank."""
    run_helper("tiny_clip_train.py", tmp_path / "one", 3, "--patch-keep", patch_keep, timeout=300)
    run_helper("tiny_clip_train.py", tmp_path / "two", 3, "--patch-keep", patch_keep, procs=2, timeout=300)
    assert_same_training(tmp_path / "one" / METRICS, tmp_path / "two" / METRICS,
                         tmp_path / "one" / "final.safetensors", tmp_path / "two" / "final.safetensors")


def test_short_lit_run_on_scenes_learns_colour(tmp_path, minilm_available):
    """A tiny ViT against the locked MiniLM, 64-px scenes, 200 steps (~1-2 minutes): zero-shot
    colour on the val split well above the 1/8 chance (measured here: about 0.3-0.4)."""
    from vlmlab.api import dual_encoder
    from vlmlab.data.scenes import COLOR_NAMES, SceneConfig, classification_sample
    from vlmlab.models import lit
    from vlmlab.train.clip import ClipRecipe, train_clip

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5)
    model = dual_encoder(lit.LiTNet.new(vision, seed=0), lit, name="tiny-lit")
    cfg = TrainConfig(steps=200, batch_size=48, lr=1e-3, warmup_steps=5, log_every=20, save_every=100,
                      precision="bf16" if fast_bfloat16() else "fp32")  # bf16 autocast is hundreds of times slower on CPUs without it
    logged = train_clip(model, ClipRecipe(data="scenes", scene_size=64), cfg, tmp_path, progress=False)
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.2
    scene_cfg = SceneConfig(width=64, height=64)
    samples = [classification_sample(i, "val", scene_cfg) for i in range(64)]
    from vlmlab.train.clip import COLOR_PHRASES

    probs = model.classify([s.images[0] for s in samples], list(COLOR_NAMES), templates=list(COLOR_PHRASES))
    truth = [COLOR_NAMES.index(s.scenes[0].objects[0].color) for s in samples]
    acc = (probs.argmax(-1) == torch.tensor(truth)).float().mean().item()
    assert acc >= 0.25, acc  # chance: 0.125
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["architectures"] == ["VlmlabLiTModel"]
    import vlmlab

    again = vlmlab.load(tmp_path / "model")
    torch.testing.assert_close(again.embed_image([samples[0].images[0]]), model.embed_image([samples[0].images[0]]))


def test_multi_positive_infonce_equals_a_direct_computation():
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    groups = torch.tensor([0, 1, 0, 2, 1])  # texts 0/2 and 1/4 are the same text
    scale = torch.tensor(1.0)
    got = ContrastiveLoss("infonce")(img, txt, scale, groups=groups)
    a, b = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = math.exp(1.0) * a @ b.T
    pos = (groups[:, None] == groups[None, :]).float()
    soft = pos / pos.sum(-1, keepdim=True)
    i2t = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    t2i = -(soft * logits.T.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(got, (i2t + t2i) / 2)
    # all-distinct groups are plain InfoNCE
    distinct = ContrastiveLoss("infonce")(img, txt, scale, groups=torch.arange(5))
    torch.testing.assert_close(distinct, ContrastiveLoss("infonce")(img, txt, scale))


def test_multi_positive_sigmoid_labels_repeats_positive():
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    groups = torch.tensor([7, 7, 9])
    got = ContrastiveLoss("sigmoid")(img, txt, torch.tensor(0.5), torch.tensor(-1.0), groups=groups)
    logits = math.exp(0.5) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T - 1.0
    labels = torch.where(groups[:, None] == groups[None, :], 1.0, -1.0)
    torch.testing.assert_close(got, -F.logsigmoid(labels * logits).sum() / 3)


def test_text_groups_ignore_padding_width():
    from vlmlab.train.clip import text_groups

    a = torch.tensor([[1, 5, 9, 0, 0], [1, 5, 9, 0, 0], [1, 6, 9, 0, 0]])
    mask_a = (a != 0).long()
    b = torch.tensor([[1, 5, 9]])  # the same text padded to another width (another process)
    g_a, g_b = text_groups(a, mask_a), text_groups(b, torch.ones_like(b))
    assert g_a[0] == g_a[1] != g_a[2] and g_b[0] == g_a[0]


def test_zoomed_scene_pairs_keep_the_object_and_drop_its_size():
    import random

    import numpy as np

    from vlmlab.data.scenes import COLORS, generate_sample
    from vlmlab.train.clip import scenes_pair, zoom_crop

    plain = [scenes_pair(i) for i in range(0, 24, 2)]
    zoomed = [scenes_pair(i, zoom=1.0) for i in range(0, 24, 2)]
    assert [t for _, t in plain] == [scenes_pair(i, zoom=0.0)[1] for i in range(0, 24, 2)]  # zoom 0: unchanged
    assert [np.asarray(a).tobytes() for a, _ in zoomed] == [np.asarray(scenes_pair(i, zoom=1.0)[0]).tobytes()
                                                            for i in range(0, 24, 2)]  # deterministic
    assert not any(w in t.split() for _, t in zoomed for w in ("small", "large"))
    assert any(w in t.split() for _, t in plain for w in ("small", "large"))
    def object_pixels(image, colour):
        pixels = np.asarray(image).reshape(-1, 3).astype(int)
        return int((np.abs(pixels - np.array(COLORS[colour])).sum(-1) < 30).sum())

    for i, (image, _), (scene_image, _) in zip(range(0, 24, 2), zoomed, plain):
        obj = generate_sample("classify", i // 2, "train").scenes[0].objects[0]
        assert image.size == (224, 224)
        # the whole object is in view, drawn at least as large as in the scene (bicubic edges aside)
        assert object_pixels(image, obj.color) >= 0.8 * object_pixels(scene_image, obj.color) > 0
    image = generate_sample("classify", 0, "train").images[0]
    box = generate_sample("classify", 0, "train").scenes[0].objects[0].box
    crops = [zoom_crop(image, box, random.Random(seed)) for seed in range(30)]
    assert all(c.size == image.size for c in crops)
    assert len({np.asarray(c).tobytes() for c in crops}) > 20  # a spread of crops, not one
