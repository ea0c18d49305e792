"""A micro LLaVA (new weights, SmolLM2's tokenizer) trained for a few steps by `train_recipe`:
used by tests/test_train_vlm.py in one process and under `torchrun --nproc_per_node 2` (same
global batch).

    python tiny_vlm_train.py OUT STEPS [GRAD_ACCUM [PARALLEL [LORA]]]

PARALLEL: ddp (default) or fsdp; LORA: 1 adds LoRA adapters (r 4 on q/v) to the language model.
"""

from __future__ import annotations

import sys

import torch

from vlmlab.train.trainer import distributed_teardown
from vlmlab.train.vlm import train_recipe

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=256)
SCENE = dict(width=32, height=32, min_objects=1, max_objects=3, p_words=0.0)


def recipe(steps: int, grad_accum: int = 1, parallel: str = "ddp", lora: bool = False) -> dict:
    # color + count: answers of different token lengths, so ranks hold different numbers of labels
    stage = {"name": "s", "steps": steps, "batch_size": 4, "grad_accum": grad_accum, "lr": 1e-3, "parallel": parallel,
             "warmup_steps": 1, "save_every": 10, "log_every": 1,
             "data": {"source": "scenes", "tasks": "color,count,caption_short", "scene": SCENE}}
    if lora:  # the language model frozen except its adapters; the projector trains
        stage.update(param_groups={"": 0.0, "multi_modal_projector": 1e-3},
                     lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "under": "language_model",
                           "lr": 1e-3})
    return {"name": "micro", "model": {"new": dict(vision=VISION, text=TEXT, image_token="<empty_output>")},
            "stages": [stage]}


if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    accum = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    parallel = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    lora = len(sys.argv) > 5 and sys.argv[5] == "1"
    torch.set_num_threads(1)
    model = train_recipe(recipe(steps, accum, parallel, lora), out, progress=False)
    distributed_teardown()
