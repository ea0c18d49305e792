"""The OpenAI dialect the server speaks: parsing chat-completions, embeddings and classify
requests into plain values (with a precise message for every malformed field), and building the
response objects and stream chunks exactly as the official `openai` client parses them.

Chat messages become vlmlab's own form: content is text with one "<image>" marker per image
part, in order (`infer.vlm` turns markers into the checkpoint's image tokens), and the images'
URLs are collected to be fetched and decoded by `serve.media`. An image part followed by text
becomes "<image>\\ntext", which is exactly the prompt `vlmlab ask --image F "text"` builds.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from vlmlab.errors import InputError
from vlmlab.infer.vlm import IMAGE_MARKER
from vlmlab.serve.config import ServeConfig

ROLES = ("system", "user", "assistant")
# Accepted but meaningless here at their neutral value; anything else is refused by name.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": None,
           "tools": None, "tool_choice": None, "functions": None, "function_call": None,
           "logit_bias": None, "parallel_tool_calls": None, "audio": None, "modalities": None}


class RequestError(InputError):
    """A request field that is wrong; `param` names it (OpenAI's error.param)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # {"role", "content": text with "<image>" markers}
    images: list[str]  # the image URLs, in the order of the markers
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(f"{name} must be {what}, got {_show(value)}", name)
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = _get(body, name, (int, float), default, "a number")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise RequestError(f"{name} must be between {lo} and {hi}, got {value}", name)
    return float(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_model(body: Any) -> str:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model is required: the name of a served model (GET /v1/models lists them)", "model")
    return model


def parse_chat(body: Any, config: ServeConfig) -> ChatRequest:
    """A chat-completions request body -> `ChatRequest`, or a `RequestError` naming the field."""
    model = parse_model(body)
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral, []):
            raise RequestError(f"{name} is not supported by this server", name)
    messages, images = _parse_messages(body.get("messages"))
    if len(images) > config.max_images:
        raise RequestError(f"the request has {len(images)} images; at most {config.max_images} are allowed "
                           "(max_images)", "messages")
    max_tokens = _get(body, "max_completion_tokens", (int,), None, "an integer")
    max_tokens = _get(body, "max_tokens", (int,), max_tokens, "an integer")
    if max_tokens is not None and not 1 <= max_tokens <= config.max_tokens:
        raise RequestError(f"max_tokens must be between 1 and {config.max_tokens} (the server's limit), "
                           f"got {max_tokens}", "max_tokens")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    n = _get(body, "n", (int,), 1, "an integer")
    if not 1 <= n <= config.max_n:
        raise RequestError(f"n must be between 1 and {config.max_n}, got {n}", "n")
    options = _get(body, "stream_options", (dict,), {}, "an object")
    return ChatRequest(
        model=model, messages=messages, images=images,
        stream=_get(body, "stream", (bool,), False, "true or false"),
        include_usage=bool(_get(options, "include_usage", (bool,), False, "true or false")),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        seed=_get(body, "seed", (int,), None, "an integer"),
        stop=stop, n=n,
    )


def _parse_messages(messages: Any) -> tuple[list[dict], list[str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list) and content:
            text = _parse_parts(content, where, role, images)
        else:
            raise RequestError(f"{where}.content must be a string or a non-empty list of content parts",
                               f"{where}.content")
        out.append({"role": role, "content": text})
    return out, images


def _parse_parts(parts: list, where: str, role: str, images: list[str]) -> str:
    """Content parts -> text with "<image>" markers (image parts must be in user messages)."""
    text, after_image = "", False
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            piece = part.get("text")
            if not isinstance(piece, str):
                raise RequestError(f"{at}.text must be a string", f"{at}.text")
            text += ("\n" if after_image else "") + piece
            after_image = False
        elif kind == "image_url":
            if role != "user":
                raise RequestError(f"{at}: images are only allowed in user messages, not {role}", at)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):  # an empty or bad URL is refused by serve.media, saying why
                raise RequestError(f'{at}.image_url must be {{"url": "data:image/...;base64,..."}}', f"{at}.image_url")
            images.append(url)
            text += IMAGE_MARKER
            after_image = True
        else:
            raise RequestError(f"{at}.type must be 'text' or 'image_url', got {_show(kind)}", f"{at}.type")
    return text


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[str]
    base64: bool


def is_image_input(text: str) -> bool:
    """An embeddings input that is an image (a data URI or an image URL), not text."""
    return text.startswith(("data:", "http://", "https://", "file://"))


def parse_embeddings(body: Any, config: ServeConfig) -> EmbeddingRequest:
    model = parse_model(body)
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) and x for x in inputs):
        raise RequestError("input must be a non-empty string or a non-empty list of non-empty strings "
                           "(texts, or images as data URIs)", "input")
    if len(inputs) > config.max_inputs:
        raise RequestError(f"input has {len(inputs)} items; at most {config.max_inputs} are allowed", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError(f"encoding_format must be 'float' or 'base64', got {_show(fmt)}", "encoding_format")
    return EmbeddingRequest(model, inputs, fmt == "base64")


def parse_classify(body: Any) -> tuple[str, str, list[str], list[str] | None]:
    model = parse_model(body)
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise RequestError("image must be an image URL (a data URI: data:image/png;base64,...)", "image")
    labels = body.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise RequestError("labels must be a non-empty list of non-empty strings", "labels")
    templates = body.get("templates")
    if templates is not None and (not isinstance(templates, list) or not all(isinstance(t, str) for t in templates)):
        raise RequestError("templates must be a list of strings, each with '{}' for the label", "templates")
    return model, image, [x.strip() for x in labels], templates


# ---- responses -----------------------------------------------------------------------------------


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def locations(result) -> dict:
    """The boxes and points of an answer (pixels of the first image), as the message's extra fields."""
    if result.boxes is None:
        return {}
    return {"boxes": [[round(v, 1) for v in b] for b in result.boxes],
            "points": [[round(v, 1) for v in p] for p in result.points or []]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, results: list, prompt_tokens: int) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text, **locations(r)},
                "logprobs": None, "finish_reason": r.finish_reason} for i, r in enumerate(results)]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, sum(len(r.token_ids) for r in results))}


def chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def embedding_list(model: str, vectors, as_base64: bool, prompt_tokens: int) -> dict:
    data = []
    for i, v in enumerate(vectors):
        values = v.tolist()
        emb = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode() if as_base64 else values
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model, "usage": usage(prompt_tokens, 0)}
