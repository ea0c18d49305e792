"""The web page of `vlmlab serve` in headless Chromium, against the real server and the shipped
scenes-smol / scenes-clip models: what the page shows must equal what the HTTP API answers.

Uses Debian's /usr/bin/chromium through Playwright (never a downloaded browser).
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCENE = ROOT / "examples" / "scene.png"
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 180_000  # generation on a shared 2-core CPU

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
]

sync_api = pytest.importorskip("playwright.sync_api")

import vlmlab  # noqa: E402
from vlmlab.serve import ServeConfig, create_app  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from server import live_server  # noqa: E402

QUESTION = "Where is the large circle? Give its bounding box."
LABELS = ["a green circle", "a red square", "a blue triangle"]


@pytest.fixture(scope="module")
def base_url():
    models = {"scenes-smol": vlmlab.load("scenes-smol", dtype="auto"), "scenes-clip": vlmlab.load("scenes-clip")}
    with live_server(create_app(models, ServeConfig())) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, base_url):
    """The page loaded and idle (models listed); fails the test on any uncaught JavaScript error."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    js_errors: list[str] = []
    page.on("pageerror", lambda e: js_errors.append(str(e)))
    page.goto(base_url + "/")
    wait_state(page, "idle")
    yield page
    context.close()
    assert not js_errors, f"uncaught JavaScript errors: {js_errors}"


def wait_state(page, state: str) -> None:
    page.wait_for_function(f"document.body.dataset.state === {json.dumps(state)}", timeout=TIMEOUT_MS)


def post(base_url: str, path: str, body: dict) -> tuple[int, dict]:
    """POST JSON to the server; returns (status, decoded JSON body) for 2xx and 4xx alike."""
    req = urllib.request.Request(base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_MS / 1000) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def unstreamed(body: dict) -> dict:
    """The same chat request asking for one JSON answer instead of a stream."""
    return {**{k: v for k, v in body.items() if k != "stream_options"}, "stream": False}


def record_answer_texts(page) -> None:
    """Collect each distinct text #answer shows while it streams (in window.__answers)."""
    page.evaluate("""() => {
        window.__answers = [];
        const answer = document.getElementById('answer');
        new MutationObserver(() => window.__answers.push(answer.textContent))
            .observe(answer, {childList: true, characterData: true, subtree: true});
    }""")


def ask(page, question: str):
    """Type the question, click Ask, wait for the end of the stream; returns the chat response."""
    page.fill("#question", question)
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as info:
        page.click("#ask")
    wait_state(page, "done")
    return info.value


def test_ask_streams_the_answer_and_draws_its_boxes(page, base_url):
    page.select_option("#model", "scenes-smol")
    page.set_input_files("#file", str(SCENE))
    page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
    assert page.get_attribute("#overlay", "viewBox") == "0 0 224 224"
    record_answer_texts(page)
    response = ask(page, QUESTION)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")

    # The page sent the image as a data URI in the first user turn, greedy decoding.
    sent = response.request.post_data_json
    assert sent["stream"] is True and sent["model"] == "scenes-smol" and sent["temperature"] == 0
    [turn] = sent["messages"]
    assert turn["role"] == "user"
    assert turn["content"] == [{"type": "image_url", "image_url": {"url": data_uri(SCENE)}},
                               {"type": "text", "text": QUESTION}]

    # The streamed text equals the API's non-streamed answer to the same request.
    status, api = post(base_url, "/v1/chat/completions", unstreamed(sent))
    assert status == 200, api
    message = api["choices"][0]["message"]
    answer = page.text_content("#answer")
    assert answer and answer == message["content"]

    # It streamed: #answer showed growing prefixes of the final text before the end.
    seen = [t for t in page.evaluate("window.__answers") if t]
    assert len(set(seen)) >= 2, f"#answer changed only once: {seen}"
    assert all(answer.startswith(t) for t in seen)

    # One rect per box, one circle per point, in pixels of the original image.
    assert message["boxes"], f"the model gave no box: {message['content']!r}"
    rects = page.eval_on_selector_all(
        "#overlay rect.box", "els => els.map(e => ['x', 'y', 'width', 'height'].map(a => +e.getAttribute(a)))")
    expected = [[min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0)] for x0, y0, x1, y1 in message["boxes"]]
    assert len(rects) == len(expected) and sum(rects, []) == pytest.approx(sum(expected, []), abs=1e-6)
    points = page.eval_on_selector_all(
        "#overlay circle.point", "els => els.map(e => [+e.getAttribute('cx'), +e.getAttribute('cy')])")
    expected = message.get("points") or []
    assert len(points) == len(expected) and sum(points, []) == pytest.approx(sum(expected, []), abs=1e-6)
    assert page.is_visible("#overlay rect.box")
    stats = page.text_content("#stats")
    assert f"{api['usage']['prompt_tokens']} prompt + {api['usage']['completion_tokens']} completion tokens" in stats
    assert "tokens/s" in stats
    assert not page.is_visible("#error")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve_page.png"
    shot.unlink(missing_ok=True)
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_follow_up_resends_the_conversation_and_new_chat_clears_it(page, base_url):
    page.select_option("#model", "scenes-smol")
    page.set_input_files("#file", str(SCENE))
    page.fill("#max-tokens", "24")
    ask(page, QUESTION)
    answer1 = page.text_content("#answer")
    page.fill("#question", "What color is it?")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as info:
        page.press("#question", "Enter")  # Enter sends
    wait_state(page, "done")

    sent = info.value.request.post_data_json
    assert sent["max_tokens"] == 24
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert sent["messages"][0]["content"][0]["type"] == "image_url"  # the image rides in the first turn only
    assert sent["messages"][1]["content"] == answer1
    assert sent["messages"][2]["content"] == "What color is it?"
    status, api = post(base_url, "/v1/chat/completions", unstreamed(sent))
    assert status == 200, api
    assert page.text_content("#answer") == api["choices"][0]["message"]["content"]
    assert page.eval_on_selector_all("#history li", "els => els.length") == 2

    page.click("#new-chat")
    assert page.eval_on_selector_all("#history li", "els => els.length") == 0
    assert page.eval_on_selector_all("#overlay > *", "els => els.length") == 0
    assert not page.is_visible("#answer")


def test_classify_shows_the_api_probabilities(page, base_url):
    page.select_option("#model", "scenes-clip")
    assert page.is_visible("#labels") and not page.is_visible("#question")
    page.set_input_files("#file", str(SCENE))
    page.fill("#labels", ", ".join(LABELS))
    with page.expect_response(lambda r: r.url.endswith("/v1/classify")) as info:
        page.click("#classify")
    wait_state(page, "done")
    sent = info.value.request.post_data_json
    assert sent == {"model": "scenes-clip", "image": data_uri(SCENE), "labels": LABELS}

    rows = page.eval_on_selector_all(".prob", "els => els.map(e => [e.dataset.label, +e.dataset.p, e.textContent])")
    assert len(rows) == 3
    status, api = post(base_url, "/v1/classify", sent)
    assert status == 200, api
    expected = sorted(zip(api["labels"], api["probabilities"]), key=lambda r: -r[1])
    assert [r[0] for r in rows] == [label for label, _ in expected]
    assert [r[1] for r in rows] == pytest.approx([p for _, p in expected], abs=1e-9)
    assert sum(r[1] for r in rows) == pytest.approx(1.0, abs=1e-4)
    for label, p, text in rows:
        assert label in text and f"{100 * p:.1f}%" in text


def test_server_error_is_shown(page, base_url, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    page.select_option("#model", "scenes-smol")
    page.set_input_files("#file", str(bad))
    page.fill("#question", "What is this?")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as info:
        page.click("#ask")
    wait_state(page, "error")
    assert info.value.status == 400
    status, api = post(base_url, "/v1/chat/completions", info.value.request.post_data_json)
    assert status == 400 and "not an image" in api["error"]["message"]
    assert page.is_visible("#error")
    assert api["error"]["message"] in page.text_content("#error")
    assert page.input_value("#question") == "What is this?"  # given back for a retry


def test_image_by_drop_and_by_paste(page):
    """Both ways in give the page the file's bytes as a data URI (sent to /v1/classify)."""
    page.select_option("#model", "scenes-clip")
    page.fill("#labels", ", ".join(LABELS))
    b64 = base64.b64encode(SCENE.read_bytes()).decode()
    make_transfer = """(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'scene.png', {type: 'image/png'}));
        return dt;
    }"""
    for how, script in [
        ("drop", f"(b64) => document.getElementById('dropzone').dispatchEvent("
                 f"new DragEvent('drop', {{dataTransfer: ({make_transfer})(b64), bubbles: true, cancelable: true}}))"),
        ("paste", f"(b64) => document.dispatchEvent("
                  f"new ClipboardEvent('paste', {{clipboardData: ({make_transfer})(b64), "
                  f"bubbles: true, cancelable: true}}))"),
    ]:
        page.evaluate("document.getElementById('preview').removeAttribute('src')")
        page.evaluate(script, b64)
        page.wait_for_function("document.getElementById('preview').naturalWidth === 224")
        with page.expect_request(lambda r: r.url.endswith("/v1/classify")) as info:
            page.click("#classify")
        wait_state(page, "done")
        assert info.value.post_data_json["image"] == data_uri(SCENE), how
        assert page.eval_on_selector_all(".prob", "els => els.length") == 3, how


def generated_tokens(base_url: str) -> int:
    """scenes-smol's generated-token counter from GET /metrics, once no row is decoding."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(base_url + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
        values = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
                  if line.endswith('{model="scenes-smol"}', 0, line.rfind(" "))}
        if values["vlmlab_running"] == 0 or time.monotonic() > deadline:
            return int(values["vlmlab_generated_tokens_total"])
        time.sleep(0.1)


def test_stop_aborts_the_stream(page, base_url):
    """Stop ends the stream in the page, and the server stops decoding the abandoned row."""
    page.select_option("#model", "scenes-smol")
    page.fill("#max-tokens", "1024")
    before = generated_tokens(base_url)
    page.fill("#question", "Write a long essay about the history of Rome.")  # hundreds of tokens
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as info:
        page.click("#ask")
    page.wait_for_function("document.getElementById('answer').textContent.length > 0")
    assert page.is_enabled("#stop") and page.is_disabled("#ask")
    page.click("#stop")
    wait_state(page, "done")
    assert page.text_content("#stats") == "stopped"
    assert page.is_enabled("#ask") and page.is_disabled("#stop")
    assert not page.is_visible("#error")
    stopped = generated_tokens(base_url) - before

    status, api = post(base_url, "/v1/chat/completions", unstreamed(info.value.post_data_json))
    assert status == 200, api
    full = api["usage"]["completion_tokens"]
    assert full > 20, "the answer is too short to stop in the middle"
    assert stopped < full, f"the server decoded {stopped} of {full} tokens after Stop"
