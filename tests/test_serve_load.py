"""`vlmlab serve` under load: a real server process with the shipped scenes-smol model and a small
queue, 16 closed-loop clients for 60 s plus clients that leave in the middle of streamed answers,
then one streaming and one non-streaming client that leave, alone, while their answer is generated.

What must hold: no 5xx; every request is either answered (200 with content and usage) or refused
(429 with Retry-After and an OpenAI error object); the rows of departed clients are freed; memory
stays bounded; the server still answers afterwards. Latency and throughput are printed (pytest -s)
and written to test-artifacts/serve_load.json, never asserted (speed is measured in benchmarks/).
The load generator is benchmarks/serve.py's.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import socket
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CLIENTS, ABORT_CLIENTS, DURATION_S = 16, 2, 60.0
MAX_BATCH, MAX_QUEUE = 8, 4  # 16 clients > 8 rows + 4 waiting: some requests are refused
RSS_GROWTH_LIMIT_MIB = 500
CHAT = 'route="/v1/chat/completions"'


def load_bench():
    """benchmarks/serve.py as a module (it is a script, not part of the package)."""
    name = "vlmlab_benchmarks_serve"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "serve.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def status_counts(metrics: dict[str, float]) -> dict[int, int]:
    """Chat requests by status, from /metrics."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("vlmlab_requests_total{") and CHAT in key:
            out[int(key.split('status="')[1].split('"')[0])] = int(value)
    return out


def leave_non_streaming(server, body: bytes) -> tuple[float, float | None]:
    """Send a non-streaming request, close the connection once its row produced a few tokens; return
    the tokens generated after that and the seconds until the server is idle."""
    key = 'vlmlab_generated_tokens_total{model="scenes-smol"}'
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    start, deadline = server.metrics()[key], time.monotonic() + 30
    while server.metrics()[key] - start < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    left = server.metrics()[key]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    t = time.monotonic()
    idle = server.wait_idle(timeout=15)
    return server.metrics()[key] - left, None if idle is None else time.monotonic() - t


def test_serve_under_load_refuses_cleanly_frees_rows_and_keeps_memory(tmp_path):
    bench = load_bench()
    image = bench.image_data_uri()
    # A mix of short and long answers: vqa questions (max_tokens 16) and captions (max_tokens 48).
    bodies = [bench.chat_body(q, 16, image=image) for q in bench.VQA_QUESTIONS]
    bodies.insert(2, bench.chat_body(bench.CAPTION, 48, image=image))
    bodies.insert(5, bench.chat_body(bench.CAPTION, 48, image=image))
    # The leaving clients ask for a long answer: a row nobody frees would run for 64 tokens.
    abort_body = bench.chat_body(bench.CAPTION, 64, image=image, stream=True)

    with bench.ServerProcess(max_batch=MAX_BATCH, max_queue=MAX_QUEUE, dtype="auto",
                             log_path=tmp_path / "server.log") as server:
        # warm-up: one full batch of both kinds of request, so that later growth is not first-use allocation
        warm = bench.summarise(bench.run_load(server.url, bodies, MAX_BATCH, requests=2 * MAX_BATCH))
        assert warm["answered"] == 2 * MAX_BATCH, warm["invalid"]
        rss_warm = server.rss_mib()
        before = status_counts(server.metrics())

        load = bench.run_load(server.url, bodies, CLIENTS, duration_s=DURATION_S, abort_clients=ABORT_CLIENTS,
                              abort_body=abort_body)
        stats = bench.summarise(load)
        idle_s = server.wait_idle(timeout=15)
        rss_after = server.rss_mib()
        health = server.health()
        metrics = server.metrics()
        after = status_counts(metrics)

        # One more departure, alone, measured: the tokens the server makes after the client left.
        tokens0 = metrics['vlmlab_generated_tokens_total{model="scenes-smol"}']
        gone = bench.stream_and_abort(server.url, abort_body)
        left_at = time.monotonic()
        freed_s = server.wait_idle(timeout=15)
        freed_s = None if freed_s is None else time.monotonic() - left_at
        made_after = server.metrics()['vlmlab_generated_tokens_total{model="scenes-smol"}'] - tokens0
        # ... and a client of a non-streaming request that leaves while its answer is being generated
        ns_made_after, ns_freed_s = leave_non_streaming(server, bench.chat_body(bench.CAPTION, 64, image=image))
        log_tail = server.log_tail()

    chat = [o for o in load["outcomes"] if o.kind == "chat"]
    aborts = [o for o in load["outcomes"] if o.kind == "abort"]
    delta = {s: after.get(s, 0) - before.get(s, 0) for s in set(after) | set(before)}
    report = {
        "clients": CLIENTS, "abort_clients": ABORT_CLIENTS, "duration_s": DURATION_S, "max_batch": MAX_BATCH,
        "max_queue": MAX_QUEUE, **{k: v for k, v in stats.items()},
        "answered_latency_s": {"p50": stats["p50_s"], "p99": stats["p99_s"], "max": stats["max_s"]},
        "rss_mib": {"after_warmup": rss_warm, "after_load": rss_after, "growth": rss_after - rss_warm},
        "idle_after_load_s": idle_s, "metrics_chat_status_delta": delta,
        # streams whose client left before their last byte: /metrics counts them as 499
        "left_streams_counted_in_metrics": delta.get(499, 0),
        "lone_abort": {"status": gone.status, "freed_after_s": freed_s, "tokens_after_leaving": made_after},
        "lone_non_streaming_departure": {"freed_after_s": ns_freed_s, "tokens_after_leaving": ns_made_after},
        "health_after": health,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "serve_load.json").write_text(json.dumps(report, indent=1))
    print(f"\nserve load, {CLIENTS} clients + {ABORT_CLIENTS} leaving mid-stream, {DURATION_S:g} s, "
          f"max_batch {MAX_BATCH}, max_queue {MAX_QUEUE}: {stats['requests']} requests, {stats['answered']} answered, "
          f"{stats['refused_429']} refused (429), {stats['aborted_streams']} streams left; "
          f"{stats['req_per_s']:.2f} req/s, {stats['tokens_per_s']:.1f} tok/s; latency of answered: "
          f"p50 {stats['p50_s']:.2f} s, p99 {stats['p99_s']:.2f} s; RSS {rss_warm:.0f} -> {rss_after:.0f} MiB; "
          f"idle {idle_s} s after the load; a lone stream left: freed after {freed_s} s, {made_after:.0f} tokens after "
          f"it; a non-streaming client left: freed after {ns_freed_s} s, {ns_made_after:.0f} tokens after it; "
          f"streams left during the load counted in /metrics: {report['left_streams_counted_in_metrics']}")

    def lines(outcomes):
        return "\n".join(f"{o.kind} #{o.index}: {o.status} {o.problem}" for o in outcomes if not o.valid)[:3000]

    # no 5xx, no dropped connection; every answer has the shape of its status
    assert stats["server_errors_5xx"] == 0 and not any(500 <= s < 600 for s in delta), (delta, log_tail)
    assert stats["no_answer"] == 0, lines(load["outcomes"])
    assert all(o.status in (200, 429) for o in chat + aborts), lines(chat + aborts)
    assert all(o.valid for o in chat + aborts), lines(chat + aborts)
    assert stats["answered"] >= CLIENTS, stats  # many answered ...
    assert stats["refused_429"] > 0, stats  # ... and the small queue refused some
    # leaving clients tried; on a slow CPU the small queue can refuse every one of them during the
    # load (then the lone departures below are what shows rows are freed)
    assert stats["aborted_streams"] + stats["aborts_refused_429"] > 0, stats
    # the server counted them: every answer and refusal the clients saw is in /metrics
    assert delta.get(429, 0) == stats["refused_429"] + stats["aborts_refused_429"], (delta, stats)
    assert delta.get(200, 0) == stats["answered"], (delta, stats)
    assert delta.get(499, 0) == stats["aborted_streams"], (delta, stats)  # each stream left mid-answer
    # the rows of the clients that left are freed: nothing runs or waits once the clients are gone
    assert idle_s is not None, "rows still running or queued 15 s after the load ended"
    assert gone.status == 200 and gone.valid, gone
    assert freed_s is not None and made_after < 32, (
        f"a client left after its first chunk, yet the server generated {made_after:.0f} more tokens "
        f"(its row was freed after {freed_s} s)")
    assert ns_freed_s is not None and ns_made_after < 32, (
        f"a non-streaming client left, yet the server generated {ns_made_after:.0f} more tokens")
    # memory bounded; still healthy
    assert rss_after - rss_warm < RSS_GROWTH_LIMIT_MIB, report["rss_mib"]
    assert health["http_status"] == 200 and health["status"] == "ok", health
