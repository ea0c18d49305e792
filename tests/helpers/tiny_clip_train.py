"""A tiny CLIP trained for a few steps by `vlmlab.train.Trainer`: used by tests/test_train.py in
one process and under `torchrun --nproc_per_node 2` (same global batch), and for resume tests.

    python tiny_clip_train.py OUT STEPS [--resume] [--grad-accum N] [--patch-keep F]

--patch-keep F trains the image tower on that fraction of each image's 4 patches (FLIP's masking),
drawn per sample as `vlmlab.train.clip` draws them.
"""

from __future__ import annotations

import sys

import torch

from vlmlab.models.clip import CLIPConfig, CLIPNet
from vlmlab.text.text_encoder import TextEncoderConfig
from vlmlab.train.losses import ContrastiveLoss, clamp_logit_scale
from vlmlab.train.trainer import TrainConfig, Trainer, distributed_teardown
from vlmlab.vision.vit import ViTConfig, random_patches

EOS = 31


def tiny_clip(seed: int = 0) -> CLIPNet:
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        vision=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=16, patch_size=8, hidden_act="quick_gelu"),
        text=TextEncoderConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=8, eos_token_id=EOS),
        projection_dim=16,
    )
    net = CLIPNet(cfg)
    for name, p in net.named_parameters():  # a non-degenerate start (class/pos embeddings are zeros)
        if "embedding" in name:
            torch.nn.init.normal_(p, std=0.1)
    return net


def sample(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair i: the text is a function of the image's colour statistics, so there is something to learn."""
    g = torch.Generator().manual_seed(i)
    pixels = torch.randn(3, 16, 16, generator=g)
    cls = int(pixels.mean(dim=(1, 2)).argmax()) * 8 + int(torch.randint(0, 8, (1,), generator=g))
    ids = torch.tensor([1, 2 + cls % 29, 3, EOS, 0, 0, 0, 0])
    return pixels, ids


def data(batch_size: int, patch_keep: float = 1.0):
    def fn(step: int, micro: int, rank: int, world: int, size: int):
        start = step * batch_size + (micro * world + rank) * size
        pixels, ids = zip(*(sample(i) for i in range(start, start + size)))
        patches = random_patches(4, patch_keep, list(range(start, start + size))) if patch_keep < 1 else None
        return torch.stack(pixels), torch.stack(ids), patches

    return fn


def make_trainer(out, steps: int, grad_accum: int = 1, batch_size: int = 8, crash_at: int | None = None,
                 patch_keep: float = 1.0) -> Trainer:
    net = tiny_clip()
    loss_fn = ContrastiveLoss("infonce")
    feed = data(batch_size, patch_keep)

    def fn(step, micro, rank, world, size):
        if crash_at is not None and step == crash_at:
            raise KeyboardInterrupt("simulated kill")
        return feed(step, micro, rank, world, size)

    def step_fn(m, batch):
        img, txt = m(batch[0], batch[1], features=True, patches=batch[2])
        return loss_fn(img, txt, net.logit_scale), {}

    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=3e-3, warmup_steps=2,
                      log_every=1, save_every=2, grad_clip=1.0)
    return Trainer(net, step_fn, fn, cfg, out, after_step=lambda m: clamp_logit_scale(net.logit_scale))


if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    accum = int(sys.argv[sys.argv.index("--grad-accum") + 1]) if "--grad-accum" in sys.argv else 1
    keep = float(sys.argv[sys.argv.index("--patch-keep") + 1]) if "--patch-keep" in sys.argv else 1.0
    trainer = make_trainer(out, steps, grad_accum=accum, patch_keep=keep)
    trainer.fit(resume="--resume" in sys.argv, progress=False)
    if trainer.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, f"{out}/final.safetensors")
    distributed_teardown()
