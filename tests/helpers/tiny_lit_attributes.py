"""A tiny LiT (a 2-layer ViT against the locked MiniLM) trained by `vlmlab.train.clip.train_clip`
with the attribute heads next to the contrastive loss (`--attributes`): 3 steps of 8 64-px scenes
pairs. Used by tests/test_attributes.py in one process and under `torchrun --nproc_per_node 2`.

    python tiny_lit_attributes.py OUT
"""

from __future__ import annotations

import sys

from vlmlab.api import dual_encoder
from vlmlab.models import lit
from vlmlab.train.clip import ClipRecipe, train_clip
from vlmlab.train.trainer import TrainConfig, distributed_teardown

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
            patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5, pooling="cls")

if __name__ == "__main__":
    model = dual_encoder(lit.LiTNet.new(TINY, seed=0), lit, name="tiny-lit")
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, save_every=3, seed=0)
    train_clip(model, ClipRecipe(scene_size=64, multi_positive=True, attributes=1.0), cfg, sys.argv[1], progress=False)
    distributed_teardown()
