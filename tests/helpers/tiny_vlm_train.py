"""A micro LLaVA (new weights, SmolLM2's tokenizer) trained for a few steps by `train_recipe`:
used by tests/test_train_vlm.py in one process and under `torchrun --nproc_per_node 2` (same
global batch).

    python tiny_vlm_train.py OUT STEPS [GRAD_ACCUM]
"""

from __future__ import annotations

import sys

import torch

from vlmlab.train.vlm import train_recipe

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=256)
SCENE = dict(width=32, height=32, min_objects=1, max_objects=3, p_words=0.0)


def recipe(steps: int, grad_accum: int = 1) -> dict:
    # color + count: answers of different token lengths, so ranks hold different numbers of labels
    return {"name": "micro", "model": {"new": dict(vision=VISION, text=TEXT, image_token="<empty_output>")},
            "stages": [{"name": "s", "steps": steps, "batch_size": 4, "grad_accum": grad_accum, "lr": 1e-3,
                        "warmup_steps": 1, "save_every": 10, "log_every": 1,
                        "data": {"source": "scenes", "tasks": "color,count,caption_short", "scene": SCENE}}]}


if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    accum = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    torch.set_num_threads(1)
    model = train_recipe(recipe(steps, accum), out, progress=False)
