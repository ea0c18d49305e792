"""Tokenizers: a Hugging Face `tokenizer.json` folder or a GGUF file's vocabulary, plus chat templates.

The encoding itself runs in the `tokenizers` library. What this module adds is building that
pipeline from GGUF metadata so it encodes exactly as transformers' tokenizer for the same file,
reading and writing the HF folder layout, and rendering the checkpoint's own Jinja chat template
the way transformers does (sandboxed, same globals), so prompts match the reference token for token.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from vlmlab.checkpoints.hf import atomic_write, read_json, write_json
from vlmlab.errors import InputError, TokenizerError

# The named special tokens, in the order HF config files list them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
CONTROL_TOKEN = 3
USER_DEFINED_TOKEN = 4

# transformers writes this as `model_max_length` when a tokenizer has no limit.
_NO_LIMIT = int(1e29)

# Pre-tokenizer regexes for byte-level GGUF vocabularies, keyed by `tokenizer.ggml.pre`.
# A vocabulary's merges were learned on text split this way, so splitting differently changes ids.
# A `pre` value not listed here (e.g. "smollm", "gpt2") gets GPT-2's own split, as in transformers.
_SPLIT_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _SPLIT_LLAMA3,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _SPLIT_QWEN2),
    "qwen35": _SPLIT_QWEN35,
    "tekken": _SPLIT_TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _SPLIT_GPT4O),
}

# GGUF `tokenizer.ggml.model` values we can rebuild.
SUPPORTED_GGUF_MODELS = ("gpt2", "llama")
# Architectures whose "llama" (SentencePiece) vocabulary needs a family-specific pipeline we lack.
_UNSUPPORTED_SENTENCEPIECE_ARCHS = ("gemma", "gemma2", "gemma3")


def pad_batch(seqs: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (input_ids, attention_mask) of shape (batch, width or longest)."""
    width = width if width is not None else max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids, mask


class Tokenizer:
    """Text <-> token ids for one checkpoint, with its special tokens and chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        source: str = "<tokenizer>",
    ) -> None:
        """Wrap a `tokenizers.Tokenizer` (`special_tokens` maps "bos_token", ... to token strings).

        With `add_bos_token`/`add_eos_token` given (GGUF files state them), the backend's
        post-processor is replaced so that `encode(..., add_special_tokens=True)` adds exactly
        those; left as None, the backend's own post-processor decides, and the flags are read off it.
        """
        self._backend = backend
        self.source = source
        self.special_tokens: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        ids = {name: backend.token_to_id(token) for name, token in self.special_tokens.items()}
        self.bos_token_id: int | None = ids.get("bos_token")
        self.eos_token_id: int | None = ids.get("eos_token")
        self.pad_token_id: int | None = ids.get("pad_token")
        self.unk_token_id: int | None = ids.get("unk_token")
        if add_bos_token is not None or add_eos_token is not None:
            self.add_bos_token = bool(add_bos_token) and self.bos_token_id is not None
            self.add_eos_token = bool(add_eos_token) and self.eos_token_id is not None
            self._backend.post_processor = _bos_eos_processor(
                self.special_tokens.get("bos_token") if self.add_bos_token else None,
                self.bos_token_id,
                self.special_tokens.get("eos_token") if self.add_eos_token else None,
                self.eos_token_id,
            )
        else:
            with_specials = self._backend.encode("", add_special_tokens=True).ids
            self.add_bos_token = bool(with_specials) and with_specials[0] == self.bos_token_id
            self.add_eos_token = bool(with_specials) and with_specials[-1] == self.eos_token_id

    # ---- vocabulary ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the whole vocabulary, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> BackendTokenizer:
        """The underlying `tokenizers.Tokenizer` (for offsets, batching options, ...)."""
        return self._backend

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, add_bos_token={self.add_bos_token})"

    # ---- encoding -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) stay whole;
        `add_special_tokens` adds the BOS/EOS the checkpoint asks for."""
        if not isinstance(text, str):
            raise InputError(f"tokenizer input must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: list[str], add_special_tokens: bool = False, max_length: int | None = None
    ) -> list[list[int]]:
        """`encode` on each text (in parallel threads inside `tokenizers`).

        max_length: cut each text's tokens from the right so that, with the special tokens the
        post-processor adds ([CLS] ... [SEP]), at most `max_length` ids remain; the special tokens
        are kept, as transformers' `truncation=True, max_length=...` does."""
        for text in texts:
            if not isinstance(text, str):
                raise InputError(f"tokenizer input must be a list of str, got an item of type {type(text).__name__}")
        if max_length is None:
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        processor = self._backend.post_processor if add_special_tokens else None
        added = processor.num_special_tokens_to_add(False) if processor is not None else 0
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= added:
            raise InputError(f"max_length must be an integer above {added} (the special tokens added), got {max_length!r}")
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for encoding in encodings:
            encoding.truncate(max_length - added)
            if processor is not None:
                encoding = processor.process(encoding)
            out.append(encoding.ids)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, or anything iterable of ints such as a 1-D tensor)."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise InputError(f"token ids must be non-negative, got {min(ids)}")
        # Ids past the vocabulary (a model's padded embedding rows) decode to nothing, as in transformers.
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # ---- chat template --------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the checkpoint's own Jinja template, as transformers does
        (`tokenize=False`): special tokens and `add_generation_prompt` are visible to the template,
        and extra keyword arguments (`tools`, `documents`, `enable_thinking`, ...) are passed through."""
        if not self.chat_template:
            raise TokenizerError(
                f"{self.source}: this tokenizer has no chat template (no 'chat_template' in "
                "tokenizer_config.json, no chat_template.jinja, no 'tokenizer.chat_template' in the GGUF); "
                "send the prompt as plain text (--no-chat, or chat=False) or use a checkpoint that ships one"
            )
        if not isinstance(messages, (list, tuple)):
            raise InputError(f"messages must be a list of dicts, got {type(messages).__name__}")
        cleaned = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise InputError(
                    f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}"
                )
            # Like transformers: a key set to None counts as absent (APIs send content=None).
            cleaned.append({k: v for k, v in message.items() if v is not None})
        template = _compile_template(self.chat_template, self.source)
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        try:
            return template.render(
                messages=cleaned, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.source}: chat template failed to render: {e}") from None
        except Exception as e:  # a template is user-supplied code; any failure is the template's
            raise TokenizerError(
                f"{self.source}: chat template failed to render ({type(e).__name__}: {e})"
            ) from None

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Load an HF tokenizer folder: tokenizer.json, tokenizer_config.json (optional),
        special_tokens_map.json (optional), chat_template.json (a VLM processor's, optional) and
        chat_template.jinja (optional; the last found wins: config, .json, .jinja)."""
        folder = Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file}: no such file (a tokenizer folder needs tokenizer.json)")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises its own exception types for bad JSON / schema
            raise TokenizerError(f"{tokenizer_file}: not a valid tokenizer.json ({e})") from None
        # A tokenizer.json may store truncation and padding settings (all-MiniLM-L6-v2's pads every
        # text to 128 tokens). Like transformers, encoding ignores them; callers ask for a max_length.
        backend.no_truncation()
        backend.no_padding()

        config = read_json(folder / "tokenizer_config.json", optional=True, error=TokenizerError)
        token_map = read_json(folder / "special_tokens_map.json", optional=True, error=TokenizerError)
        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = _token_content(config.get(name))
            if value is None:
                value = _token_content(token_map.get(name))
            if value is not None:
                special_tokens[name] = value

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
            chat_template = named.get("default") or next(iter(named.values()), None)
        processor_file = folder / "chat_template.json"  # a VLM processor's template (transformers 4.4x)
        if processor_file.is_file():
            try:
                chat_template = json.loads(processor_file.read_text(encoding="utf-8"))["chat_template"]
            except (ValueError, KeyError, TypeError) as e:
                raise TokenizerError(f"{processor_file}: expected a JSON object with 'chat_template' ({e})") from None
        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(
                f"{folder / 'tokenizer_config.json'}: 'chat_template' must be a string, "
                f"got {type(chat_template).__name__}"
            )

        max_length = config.get("model_max_length")
        if not isinstance(max_length, (int, float)) or max_length >= _NO_LIMIT:
            max_length = None
        # Like transformers 5, BOS/EOS come from tokenizer.json's post-processor; the config's
        # add_bos_token/add_eos_token are ignored when a tokenizer.json exists.
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=chat_template,
            model_max_length=None if max_length is None else int(max_length),
            source=str(folder),
        )

    @classmethod
    def from_gguf(cls, gguf_file: Any) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes (`tokenizer.ggml.*` metadata), encoding as
        transformers' `AutoTokenizer.from_pretrained(folder, gguf_file=...)` does for it.

        One deliberate difference: for a byte-level file without `<|endoftext|>` (Llama 3),
        transformers appends that GPT-2 default as an extra token whose id is past the model's
        embedding; we keep the file's vocabulary, so that text encodes as ordinary characters.
        """
        source = str(gguf_file.path)

        def field(key: str, required: bool = False) -> Any:
            value = gguf_file.field(key, None)
            if value is None and required:
                raise TokenizerError(f"{source}: GGUF metadata has no '{key}', so it carries no tokenizer")
            return value

        model_type = field("tokenizer.ggml.model", required=True)
        architecture = gguf_file.metadata.get("general.architecture")
        if model_type not in SUPPORTED_GGUF_MODELS:
            raise TokenizerError(
                f"{source}: unsupported GGUF tokenizer model tokenizer.ggml.model={model_type!r}; "
                f"supported: {', '.join(SUPPORTED_GGUF_MODELS)}"
            )
        if model_type == "llama" and architecture in _UNSUPPORTED_SENTENCEPIECE_ARCHS:
            raise TokenizerError(
                f"{source}: unsupported GGUF tokenizer: tokenizer.ggml.model='llama' for architecture "
                f"{architecture!r} needs a {architecture}-specific pipeline that vlmlab does not implement"
            )
        tokens: list[str] = field("tokenizer.ggml.tokens", required=True)
        token_types: list[int] = field("tokenizer.ggml.token_type") or []
        merges: list[str] | None = field("tokenizer.ggml.merges")

        if model_type == "gpt2":
            if merges is None:
                raise TokenizerError(f"{source}: GGUF metadata has no 'tokenizer.ggml.merges' (needed for 'gpt2' BPE)")
            backend = _byte_level_bpe(tokens, merges, field("tokenizer.ggml.pre"))
        else:
            scores = field("tokenizer.ggml.scores")
            if merges is None and scores is None:
                raise TokenizerError(
                    f"{source}: GGUF metadata has neither 'tokenizer.ggml.merges' nor 'tokenizer.ggml.scores'"
                )
            backend = _sentencepiece_bpe(tokens, merges, scores, phi3_style=architecture == "phi3")

        special_tokens = {}
        for name, key in zip(SPECIAL_TOKEN_NAMES, ("bos", "eos", "unknown", "padding")):
            token_id = field(f"tokenizer.ggml.{key}_token_id")
            if token_id is not None:
                if not 0 <= token_id < len(tokens):
                    raise TokenizerError(
                        f"{source}: 'tokenizer.ggml.{key}_token_id' = {token_id} is outside the vocabulary "
                        f"of {len(tokens)} tokens"
                    )
                special_tokens[name] = tokens[token_id]
        _add_gguf_added_tokens(backend, tokens, token_types, byte_level=model_type == "gpt2")
        _add_missing_special_tokens(backend, special_tokens.values())

        # transformers (following llama.cpp) adds BOS to a SentencePiece vocabulary unless the file
        # says otherwise; for byte-level BPE only when the file says so.
        add_bos = field("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = model_type == "llama"
        add_eos = bool(field("tokenizer.ggml.add_eos_token"))
        context = gguf_file.metadata.get(f"{architecture}.context_length") if architecture else None
        return cls(
            backend,
            special_tokens=special_tokens,
            add_bos_token=bool(add_bos),
            add_eos_token=add_eos,
            chat_template=field("tokenizer.chat_template"),
            model_max_length=int(context) if isinstance(context, int) else None,
            source=source,
        )

    # ---- saving ---------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable by
        `Tokenizer.from_folder` and by `transformers.AutoTokenizer.from_pretrained`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "tokenizer.json", self._backend.to_str(pretty=True))
        # BOS/EOS live in tokenizer.json's post-processor (what transformers 5 reads); the flags
        # are written for readers that look at the config instead.
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(folder / "tokenizer_config.json", config)
        write_json(folder / "special_tokens_map.json", self.special_tokens)


# ---- GGUF vocabularies -----------------------------------------------------------------------


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in which byte-level vocabularies are spelled.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are moved
    to code points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> BackendTokenizer:
    """GPT-2 style byte-level BPE ("gpt2" GGUFs: Llama 3, Qwen2, SmolLM, ...)."""
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        # A few converters store tokens as raw text rather than in the byte alphabet; respell those.
        if not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = BackendTokenizer(
        BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False)
    )
    split = GGUF_PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str], merges: list[str] | None, scores: list[float] | None, phi3_style: bool = False
) -> BackendTokenizer:
    """SentencePiece BPE with byte fallback ("llama" GGUFs: Llama 1/2, Mistral, Phi-3, ...).

    Most such files list no merges; they are recovered from the token scores (see `merges_from_scores`).
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = merges_from_scores(vocab, dict(zip(tokens, scores)))
    backend = BackendTokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    if phi3_style:
        # Phi-3 marks word starts with a normalizer, so a leading space is doubled differently than with Metaspace.
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: every split of a token into two vocabulary
    pieces is a merge, ranked by the token's score (best first), then by piece lengths."""
    candidates = []
    for token, score in scores.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(left, right) for left, right in splits if left in vocab and right in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((left, right, score) for left, right in splits)
    # reverse=True on a stable sort keeps ties in insertion order, the order transformers produces.
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _add_gguf_added_tokens(
    backend: BackendTokenizer, tokens: list[str], token_types: list[int], byte_level: bool
) -> None:
    """Make the file's control tokens special and its user-defined tokens (`<think>`) added tokens,
    so both are matched whole in the text instead of being cut into pieces.

    In a byte-level vocabulary a "control" token spelled outside the byte alphabet is a converter
    mislabel; adding it would grow the vocabulary past the model's embedding, so it is skipped.
    """
    alphabet = set(byte_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types)
        if kind == CONTROL_TOKEN and (alphabet is None or set(token) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types)
        if kind == USER_DEFINED_TOKEN and token in vocab
    ]
    if user_defined:
        backend.add_tokens(user_defined)


def _add_missing_special_tokens(backend: BackendTokenizer, special_tokens: Iterable[str]) -> None:
    """Named special tokens (bos/eos/unk/pad) must be matched whole too, even when the file does not
    mark them as control tokens (SentencePiece files mark `<unk>` as "unknown")."""
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(special_tokens) if t not in added]
    if missing:
        backend.add_special_tokens(missing)


def _bos_eos_processor(
    bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None
) -> processors.TemplateProcessing:
    """Post-processor adding BOS before / EOS after each sequence (either may be None)."""
    head = f"{bos}:0 " if bos is not None else ""
    tail = f" {eos}:0" if eos is not None else ""
    pair_b = (f" {bos}:1" if bos is not None else "") + " $B:1" + (f" {eos}:1" if eos is not None else "")
    special = [(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None]
    return processors.TemplateProcessing(
        single=f"{head}$A:0{tail}", pair=f"{head}$A:0{tail}{pair_b}", special_tokens=special
    )


# ---- HF folder helpers -----------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    """A special token as written in HF configs: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ---- chat templates --------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks); renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _template_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=64)
def _compile_template(template: str, source: str) -> jinja2.Template:
    try:
        return _template_environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{source}: chat template has a syntax error at line {e.lineno}: {e.message}") from None
