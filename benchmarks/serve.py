#!/usr/bin/env python
"""Serving benchmark: `vlmlab serve` throughput and latency, continuous batching on vs off.

Two real server processes run side by side (started with the `vlmlab` CLI from this venv, model
scenes-smol, `--max-queue 64`): one with batching off (`--max-batch 1`: one request decoded at a
time) and one with batching on (`--max-batch 8` by default). Only one of them has work at any
moment; the idle one waits on a condition variable and uses no CPU. For each workload and each
concurrency level C, the same C closed-loop clients run against the batching-off server, then
against the batching-on server (back to back, so both see the same machine conditions).

* A client is a thread with one keep-alive `http.client` connection (the cheapest HTTP client
  in the standard library: the load generator must leave the CPU to the server). It sends
  POST /v1/chat/completions (examples/scene.png as a base64 data URI + a question, temperature
  0, non-streaming) and sends its next request as soon as the answer arrived (closed loop).
* Workloads: "caption" = "Describe the image in detail.", max_tokens 64 (long answers:
  decode-bound); "vqa" = short questions rotated per request, max_tokens 16 (answers of 1-2
  tokens: prefill-bound).
* A level sends max(--requests, 2 x C) requests (after the warm-up described below), handed out
  from a shared counter; request i asks question i mod (number of questions), so both servers
  get the same requests. Throughput = answered requests (and usage.completion_tokens) / the wall
  time from the first send to the last answer. Latency = client-side, send to last byte; p50/p99
  interpolate linearly between order statistics (with 8-32 requests, p99 is about the maximum).
* Warm-up (not timed), per server and workload: one request, then one round of
  min(max batch, max level) concurrent requests, so that the batched shapes have run once.

Ratios: "on/off" = batching-on over batching-off throughput at the same number of clients;
"on vs seq." = batching-on at C clients over the sequential baseline, batching off with 1 client
(one request at a time). The issue's target is on vs seq. >= 3 at 8 clients (caption).

Before each level the script waits (up to --wait-quiet s) for other processes to use less than
--busy-threshold cores; during each run it records the CPU used by the server, by this load
generator and by everything else (the "others" column: > 0.25 cores means the run was disturbed).

Usage (repository root, venv active; ~8 min for everything on a 2-core machine):

    python benchmarks/serve.py                                   # both workloads, levels 1 4 8 16
    python benchmarks/serve.py --out-md docs/benchmarks.md --json /tmp/serve.json
    python benchmarks/serve.py --workload caption --levels 1 8 --requests 16
    python benchmarks/serve.py --quick                           # tiny run: checks the script works

The load generator (ServerProcess, run_load, summarise) is also used by tests/test_serve_load.py.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import http.client
import importlib.metadata
import itertools
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # machine helpers shared with the other benchmarks
from lm_decode import cpu_model, system_cpu_s, wait_for_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "scene.png"
MODEL = "scenes-smol"
CAPTION = "Describe the image in detail."
VQA_QUESTIONS = (
    "What color is the large circle?",
    "How many objects are there?",
    "What shape is in the center?",
    "Is there a blue triangle?",
    "What color is the background?",
)
WORKLOADS = {"caption": ((CAPTION,), 64), "vqa": (VQA_QUESTIONS, 16)}
QUICK_MAX_TOKENS = {"caption": 8, "vqa": 4}
MD_BEGIN, MD_END = "<!-- benchmarks/serve.py: begin -->", "<!-- benchmarks/serve.py: end -->"
MD_SECTION = "## Serving: `vlmlab serve` throughput and latency, continuous batching on vs off"


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------


def image_data_uri(path: Path = SCENE) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def chat_body(question: str, max_tokens: int, *, image: str | None = None, stream: bool = False,
              model: str = MODEL) -> bytes:
    """The JSON body of a one-image chat request (temperature 0)."""
    content = [{"type": "image_url", "image_url": {"url": image or image_data_uri()}},
               {"type": "text", "text": question}]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def workload_bodies(workload: str, max_tokens: int | None = None, model: str = MODEL) -> list[bytes]:
    questions, default_max = WORKLOADS[workload]
    image = image_data_uri()
    return [chat_body(q, max_tokens or default_max, image=image, model=model) for q in questions]


@dataclass
class Outcome:
    """What one request got. `valid`: the answer has the shape the contract promises for its status
    (200: choices[0].message.content non-empty and usage; 429: Retry-After + an OpenAI error object;
    a disconnected stream: 200 with event-stream chunks up to the disconnect)."""

    kind: str  # "chat" or "abort" (a stream closed by the client after its first content chunks)
    index: int
    status: int  # 0: no HTTP answer (connection error, timeout)
    start: float
    end: float
    completion_tokens: int = 0
    prompt_tokens: int = 0
    valid: bool = False
    problem: str | None = None
    retry_after: str | None = None
    content_sha: str | None = None  # of the answer text, to compare servers

    @property
    def latency(self) -> float:
        return self.end - self.start


def _check_refusal(status: int, headers, data: bytes) -> tuple[bool, str | None, str | None]:
    """(valid, problem, retry_after) of a non-200 answer."""
    retry = headers.get("Retry-After")
    try:
        error = json.loads(data).get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or "type" not in error:
        return False, f"{status}: no OpenAI error object in {data[:200]!r}", retry
    if status == 429 and not retry:
        return False, "429 without a Retry-After header", retry
    return status == 429, None if status == 429 else f"{status}: {error['message']}", retry


def post_chat(conn: http.client.HTTPConnection, body: bytes, index: int = 0) -> Outcome:
    """POST one non-streaming chat request on `conn` (reconnects if the server closed it)."""
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        return Outcome("chat", index, 0, start, time.perf_counter(), problem=f"{type(e).__name__}: {e}")
    out = Outcome("chat", index, resp.status, start, time.perf_counter())
    if resp.status != 200:
        out.valid, out.problem, out.retry_after = _check_refusal(resp.status, resp.headers, data)
        return out
    try:
        answer = json.loads(data)
        text = answer["choices"][0]["message"]["content"]
        usage = answer["usage"]
        out.completion_tokens, out.prompt_tokens = int(usage["completion_tokens"]), int(usage["prompt_tokens"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        out.problem = f"200 with a malformed body ({type(e).__name__}: {e}): {data[:200]!r}"
        return out
    out.content_sha = hashlib.sha1(text.encode()).hexdigest()[:12] if isinstance(text, str) else None
    out.valid = isinstance(text, str) and bool(text) and out.completion_tokens > 0
    if not out.valid:
        out.problem = f"200 with empty content or usage: {data[:200]!r}"
    return out


def stream_and_abort(base_url: str, body: bytes, content_chunks: int = 1, index: int = 0,
                     timeout: float = 300) -> Outcome:
    """Open a streaming chat request, read until `content_chunks` chunks with text arrived, then
    close the connection (a user who leaves mid-answer). The server should free the row."""
    host, port = _host_port(base_url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out = Outcome("abort", index, resp.status, start, time.perf_counter())
            out.valid, out.problem, out.retry_after = _check_refusal(resp.status, resp.headers, resp.read())
            return out
        seen = 0
        while seen < content_chunks:
            line = resp.readline()
            if not line:
                return Outcome("abort", index, 200, start, time.perf_counter(),
                               problem="the stream ended before the first content chunk")
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome("abort", index, 200, start, time.perf_counter(),
                                   problem=f"error event: {chunk['error']}")
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                seen += bool(delta.get("content"))
            elif line.startswith(b"data: [DONE]"):
                break
        return Outcome("abort", index, 200, start, time.perf_counter(), completion_tokens=seen, valid=True)
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as e:
        return Outcome("abort", index, 0, start, time.perf_counter(), problem=f"{type(e).__name__}: {e}")
    finally:
        try:
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()


def _host_port(base_url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(base_url)
    return u.hostname or "127.0.0.1", u.port or 80


# ---------------------------------------------------------------------------------------------
# load generation
# ---------------------------------------------------------------------------------------------


def run_load(base_url: str, bodies: list[bytes], clients: int, *, requests: int | None = None,
             duration_s: float | None = None, abort_clients: int = 0, abort_body: bytes | None = None,
             abort_pause_s: float = 0.5, honor_retry_after: bool = True, timeout: float = 300) -> dict:
    """Closed-loop load: `clients` threads, each sending its next request when the previous
    answer arrived. Stops after `requests` requests in all (request i sends bodies[i % len]) or,
    with `duration_s`, sends no new request after that many seconds. A 429 makes the client wait
    Retry-After seconds first. `abort_clients` more threads meanwhile open streaming requests
    (`abort_body`) and close them after the first content chunk, pausing `abort_pause_s` between.
    Returns the outcomes, the wall time (first send to last answer) and this process's CPU time."""
    if (requests is None) == (duration_s is None):
        raise ValueError("give exactly one of requests and duration_s")
    tickets, lock = itertools.count(), threading.Lock()
    outcomes: list[Outcome] = []
    host, port = _host_port(base_url)
    t0 = time.perf_counter()
    end_at = t0 + duration_s if duration_s is not None else None
    stop = threading.Event()

    def more(i: int) -> bool:
        return (i < requests) if requests is not None else (time.perf_counter() < end_at)

    def pause_after(out: Outcome) -> None:
        if out.status == 429 and honor_retry_after:
            try:
                wait = float(out.retry_after or 1)
            except ValueError:
                wait = 1.0
            left = end_at - time.perf_counter() if end_at is not None else wait
            time.sleep(max(0.0, min(wait, left)))
        elif out.status == 0:
            time.sleep(0.2)  # a connection error: do not spin

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            while True:
                with lock:
                    i = next(tickets)
                if not more(i):
                    return
                out = post_chat(conn, bodies[i % len(bodies)], i)
                with lock:
                    outcomes.append(out)
                pause_after(out)
        finally:
            conn.close()

    def aborter(k: int) -> None:
        n = 0
        while not stop.is_set() and (end_at is None or time.perf_counter() < end_at):
            out = stream_and_abort(base_url, abort_body, index=k * 1_000_000 + n, timeout=timeout)
            n += 1
            with lock:
                outcomes.append(out)
            pause_after(out)
            stop.wait(abort_pause_s)

    cpu0 = _own_cpu_s()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    if abort_clients:
        if abort_body is None:
            raise ValueError("abort_clients needs abort_body (a streaming request)")
        threads += [threading.Thread(target=aborter, args=(k,), daemon=True) for k in range(abort_clients)]
    for t in threads:
        t.start()
    for t in threads[:clients]:
        t.join()
    stop.set()  # in requests mode, the aborters stop with the last ordinary client
    for t in threads[clients:]:
        t.join()
    chat = [o for o in outcomes if o.kind == "chat"]
    last = max((o.end for o in chat), default=time.perf_counter())
    return {"outcomes": sorted(outcomes, key=lambda o: o.start), "wall_s": last - t0, "started": t0,
            "loadgen_cpu_s": _own_cpu_s() - cpu0}


def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between order statistics (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(load: dict) -> dict:
    """Counts by status, throughput and latency percentiles of the answered (200) chat requests."""
    chat = [o for o in load["outcomes"] if o.kind == "chat"]
    aborts = [o for o in load["outcomes"] if o.kind == "abort"]
    ok = [o for o in chat if o.status == 200 and o.valid]
    wall = load["wall_s"]
    lat = [o.latency for o in ok]
    every = chat + aborts
    return {
        "requests": len(chat),
        "answered": len(ok),
        "refused_429": sum(o.status == 429 for o in chat),
        "server_errors_5xx": sum(500 <= o.status < 600 for o in every),
        "no_answer": sum(o.status == 0 for o in every),
        "invalid": [f"{o.kind} #{o.index}: {o.problem}" for o in every if not o.valid][:20],
        "aborted_streams": sum(o.status == 200 and o.valid for o in aborts),
        "aborts_refused_429": sum(o.status == 429 for o in aborts),
        "wall_s": wall,
        "req_per_s": len(ok) / wall if wall > 0 else 0.0,
        "tokens_per_s": sum(o.completion_tokens for o in ok) / wall if wall > 0 else 0.0,
        "tokens_per_request": statistics.mean(o.completion_tokens for o in ok) if ok else 0.0,
        "prompt_tokens": statistics.mean(o.prompt_tokens for o in ok) if ok else 0.0,
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "max_s": max(lat, default=None),
        "loadgen_cpu_s": load["loadgen_cpu_s"],
    }


# ---------------------------------------------------------------------------------------------
# the server process
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vlmlab_command() -> list[str]:
    """The `vlmlab` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "vlmlab"
    if script.exists():
        return [str(script)]
    found = shutil.which("vlmlab")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from vlmlab.cli.main import main; sys.exit(main())"]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def _proc_status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine (including steal) so far."""
    cpu = system_cpu_s()
    return None if cpu is None else sum(cpu)


class ServerProcess:
    """`vlmlab serve` in a subprocess on a free loopback port; `with` starts it and waits until
    GET /health answers, and stops it (SIGINT, then SIGKILL) at the end. Its output goes to
    `log_path` (or a temporary file)."""

    def __init__(self, *, max_batch: int, max_queue: int = 64, dtype: str = "auto", model: str = MODEL,
                 port: int | None = None, extra_args: tuple[str, ...] = (), log_path: str | Path | None = None,
                 env: dict | None = None, vlmlab_src: str | Path | None = None, start_timeout: float = 300):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [*vlmlab_command(), "serve", "--model", model, "--host", "127.0.0.1", "--port", str(self.port),
                     "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--dtype", dtype,
                     "--log-level", "warning", *extra_args]
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vlmlab-serve-", suffix=".log")[1])
        if vlmlab_src:  # this vlmlab package ahead of the installed one
            env = dict(os.environ if env is None else env)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(vlmlab_src).resolve()), env.get("PYTHONPATH")]))
        self.env, self.start_timeout = env, start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                self._stop()
                raise RuntimeError(f"the server exited with code {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if self.get("/health")[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(f"the server did not answer /health within {self.start_timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def health(self) -> dict:
        status, data = self.get("/health")
        return {"http_status": status, **json.loads(data)}

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics")[1].decode())

    def engine_state(self, model: str = MODEL) -> tuple[float, float]:
        """(running rows, queue depth) of `model`'s engine, from /metrics."""
        m = self.metrics()
        return m.get(f'vlmlab_running{{model="{model}"}}', -1), m.get(f'vlmlab_queue_depth{{model="{model}"}}', -1)

    def wait_idle(self, timeout: float = 10, model: str = MODEL) -> float | None:
        """Seconds until no row runs and no request waits (None: not within `timeout`)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.engine_state(model) == (0, 0):
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def rss_mib(self) -> float | None:
        kib = _proc_status_kib(self.proc.pid, "VmRSS")
        return None if kib is None else kib / 1024

    def cpu_s(self) -> float | None:
        return _proc_cpu_s(self.proc.pid)


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def measure_level(server: ServerProcess, bodies: list[bytes], clients: int, requests: int) -> dict:
    """One closed-loop run; the summary with the CPU used by the server, by this process and by others."""
    busy0, srv0 = _machine_busy_s(), server.cpu_s()
    load = run_load(server.url, bodies, clients, requests=requests)
    busy1, srv1 = _machine_busy_s(), server.cpu_s()
    s = summarise(load)
    wall = s["wall_s"]
    s["server_cores"] = (srv1 - srv0) / wall if srv0 is not None and srv1 is not None else None
    s["loadgen_cores"] = s["loadgen_cpu_s"] / wall
    if None not in (busy0, busy1, s["server_cores"]):
        s["other_cores"] = max(0.0, (busy1 - busy0) / wall - s["server_cores"] - s["loadgen_cores"])
    else:
        s["other_cores"] = None
    s["answers"] = {o.index: o.content_sha for o in load["outcomes"] if o.status == 200}
    return s


def machine_info() -> dict:
    """The machine without importing torch (this process only generates load)."""
    cpu = cpu_model()
    versions = {}
    for pkg in ("torch", "fastapi", "uvicorn"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(), **versions}


def git_state(vlmlab_src: str | None = None) -> str:
    """The commit the servers run (and whether src/ had uncommitted changes)."""
    if vlmlab_src:
        return f"vlmlab from {vlmlab_src}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return commit + (" + uncommitted changes in src/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table_rows(report: dict, workload: str) -> list[list[str]]:
    levels = report["workloads"][workload]["levels"]
    base = levels[0]["off"] if levels and levels[0]["clients"] == 1 else None
    rows = []
    for lv in levels:
        off, on = lv["off"], lv["on"]
        flag = "" if max(off["other_cores"] or 0, on["other_cores"] or 0) < 0.25 else " ⚠"
        rows.append([
            workload, str(lv["clients"]), str(off["requests"]),
            f"{off['req_per_s']:.2f}", f"{on['req_per_s']:.2f}",
            f"{off['tokens_per_s']:.1f}", f"{on['tokens_per_s']:.1f}",
            f"**{fmt(ratio(on['req_per_s'], off['req_per_s']), '.2f')}**",
            fmt(ratio(on["req_per_s"], base["req_per_s"]) if base else None, ".2f"),
            f"{off['p50_s']:.2f} / {on['p50_s']:.2f}", f"{off['p99_s']:.2f} / {on['p99_s']:.2f}",
            f"{off['tokens_per_request']:.1f} / {on['tokens_per_request']:.1f}",
            f"{lv['same_answers']}/{lv['compared']}",
            f"{fmt(off['other_cores'], '.2f')} / {fmt(on['other_cores'], '.2f')}{flag}",
        ])
    return rows


HEADERS = ["workload", "clients", "requests", "req/s off", "req/s on", "tok/s off", "tok/s on", "on/off",
           "on vs seq.", "p50 s off / on", "p99 s off / on", "tok/req off / on", "same answers", "others (cores)"]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i < 1 else "---:" for i in range(len(headers))) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def markdown_report(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    lines = [
        f"**Date:** {report['date']}, commit `{report['commit']}`. **Machine:** {m['cpu']}, "
        f"{m['logical_cpus']} logical CPUs, shared (load average {' / '.join(f'{x:.2f}' for x in report['loadavg_before'])} "
        f"before the run); Python {m['python']}, torch {m['torch']}, uvicorn {m['uvicorn']}.",
        "",
        f"**Command** (repository root, venv active; {report['total_s'] / 60:.1f} min):",
        "",
        "```bash",
        f"python benchmarks/serve.py {' '.join(report['argv'])}".rstrip(),
        "```",
        "",
        f"**Setup:** two `vlmlab serve --model {cfg['model']} --dtype {cfg['dtype']} --max-queue 64` processes, "
        f"batching off (`--max-batch 1`) and on (`--max-batch {cfg['max_batch']}`), torch's default threads; "
        "closed-loop clients (threads of this script, one keep-alive `http.client` connection each) send "
        "non-streaming chat requests with examples/scene.png (one image) and temperature 0, each client its "
        "next request when its answer arrived. A level sends max("
        f"{cfg['requests']}, 2 x clients) requests after a warm-up; off and on run back to back. "
        "*caption*: \"Describe the image in detail.\", max_tokens "
        f"{cfg['max_tokens']['caption']}; *vqa*: {len(VQA_QUESTIONS)} short questions in turn, max_tokens "
        f"{cfg['max_tokens']['vqa']}. req/s and tok/s (usage.completion_tokens) over the wall time from the "
        "first send to the last answer; latency client-side to the last byte (p99 of so few requests is about "
        "the maximum). **on/off**: batching on / off at the same number of clients; **on vs seq.**: batching "
        "on at that level / batching off with 1 client (sequential serving). *same answers*: requests whose "
        "answer text is identical on both servers. *others*: cores used by other processes during the "
        "off / on run (⚠: above 0.25, the run was disturbed).",
        "",
        markdown_table(HEADERS, [r for w in report["workloads"] for r in table_rows(report, w)]),
        "",
    ]
    for w, data in report["workloads"].items():
        at8 = next((lv for lv in data["levels"] if lv["clients"] == 8), None)
        base = data["levels"][0]["off"] if data["levels"] and data["levels"][0]["clients"] == 1 else None
        if at8 and base:
            r_seq = at8["on"]["req_per_s"] / base["req_per_s"]
            r_same = at8["on"]["req_per_s"] / at8["off"]["req_per_s"]
            lines.append(f"* **{w}, 8 clients:** batching on serves {at8['on']['req_per_s']:.2f} req/s "
                         f"({at8['on']['tokens_per_s']:.1f} tok/s) = **{r_seq:.2f}x the sequential throughput** "
                         f"(batching off, 1 client: {base['req_per_s']:.2f} req/s) and {r_same:.2f}x batching off "
                         f"with the same 8 clients ({at8['off']['req_per_s']:.2f} req/s); target >= 3x: "
                         f"{'met' if r_seq >= 3 else 'not met'}.")
    problems = [f"{w} {lv['clients']} clients {mode}: {lv[mode]['invalid']}" for w, d in report["workloads"].items()
                for lv in d["levels"] for mode in ("off", "on") if lv[mode]["invalid"]]
    if problems:
        lines.append("* **Problems:** " + "; ".join(problems))
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, body: str) -> None:
    """Put `body` between the markers of the Serving section of `path` (creating the section at
    the end if missing); text of the section outside the markers is kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{MD_BEGIN}\n{body.rstrip()}\n{MD_END}"
    if MD_BEGIN in text and MD_END in text:
        text = re.sub(re.escape(MD_BEGIN) + r".*?" + re.escape(MD_END), lambda _: block, text, count=1, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n{MD_SECTION}\n\n{block}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", type=int, nargs="+", help="concurrent clients (default 1 4 8 16; --quick: 1 2)")
    ap.add_argument("--workload", choices=["caption", "vqa", "both"], default="both")
    ap.add_argument("--requests", type=int, help="requests per level: max(REQUESTS, 2 x clients) (default 8; --quick: 2)")
    ap.add_argument("--max-batch", type=int, help="--max-batch of the batching-on server (default 8; --quick: 2)")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    ap.add_argument("--model", default=MODEL, help=f"model the servers load (default {MODEL})")
    ap.add_argument("--quick", action="store_true", help="a tiny run (levels 1 2, few short answers): checks the script works")
    ap.add_argument("--out-md", type=Path, metavar="PATH", help="update the Serving section of this markdown file "
                    "(docs/benchmarks.md)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write everything (per-level summaries) here")
    ap.add_argument("--wait-quiet", type=float, default=60, metavar="S",
                    help="before each level wait up to S s for other processes to go quiet (default 60)")
    ap.add_argument("--busy-threshold", type=float, default=0.25, help="cores other processes may use (default 0.25)")
    ap.add_argument("--vlmlab-src", metavar="DIR", help="serve the vlmlab package in DIR (e.g. a `git archive` of "
                    "another commit's src/) instead of the installed one")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    levels = args.levels or ([1, 2] if args.quick else [1, 4, 8, 16])
    requests = args.requests or (2 if args.quick else 8)
    max_batch = args.max_batch or (2 if args.quick else 8)
    workloads = ["caption", "vqa"] if args.workload == "both" else [args.workload]
    max_tokens = {w: QUICK_MAX_TOKENS[w] if args.quick else WORKLOADS[w][1] for w in WORKLOADS}
    report = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": git_state(args.vlmlab_src), "argv": argv,
        "machine": machine_info(), "loadavg_before": os.getloadavg(),
        "config": {"model": args.model, "dtype": args.dtype, "max_batch": max_batch, "requests": requests,
                   "levels": levels, "max_tokens": max_tokens},
        "workloads": {},
    }
    print(f"starting two servers ({args.model}, {args.dtype}): --max-batch 1 and --max-batch {max_batch} ...",
          file=sys.stderr)
    with ServerProcess(max_batch=1, dtype=args.dtype, model=args.model, vlmlab_src=args.vlmlab_src) as off, \
            ServerProcess(max_batch=max_batch, dtype=args.dtype, model=args.model, vlmlab_src=args.vlmlab_src) as on:
        servers = {"off": off, "on": on}
        report["rss_after_start_mib"] = {k: s.rss_mib() for k, s in servers.items()}
        for w in workloads:
            bodies = workload_bodies(w, max_tokens[w], args.model)
            print(f"[{w}] warm-up", file=sys.stderr)
            for s in servers.values():
                run_load(s.url, bodies, 1, requests=1)
                burst = min(max_batch, max(levels))
                run_load(s.url, bodies, burst, requests=burst)
            rows = []
            for clients in levels:
                n = max(requests, 2 * clients)
                result = {"clients": clients}
                for mode, s in servers.items():
                    others = wait_for_quiet(args.busy_threshold, args.wait_quiet)
                    if others >= args.busy_threshold:
                        print(f"  the machine is still busy ({others:.2f} cores): measuring anyway", file=sys.stderr)
                    result[mode] = measure_level(s, bodies, clients, n)
                    r = result[mode]
                    print(f"[{w}] {clients:>2} clients, batching {mode:>3}: {r['answered']}/{r['requests']} answered, "
                          f"{r['req_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, p50 {fmt(r['p50_s'], '.2f')} s, "
                          f"p99 {fmt(r['p99_s'], '.2f')} s, {r['tokens_per_request']:.1f} tok/req, "
                          f"cores: server {fmt(r['server_cores'], '.2f')}, load generator {r['loadgen_cores']:.2f}, "
                          f"others {fmt(r['other_cores'], '.2f')}", file=sys.stderr)
                    if r["invalid"] or r["server_errors_5xx"] or r["answered"] < r["requests"]:
                        print(f"  PROBLEMS: {r['invalid']}", file=sys.stderr)
                a_off, a_on = result["off"].pop("answers"), result["on"].pop("answers")
                common = set(a_off) & set(a_on)
                result["compared"] = len(common)
                result["same_answers"] = sum(a_off[i] == a_on[i] for i in common)
                rows.append(result)
            report["workloads"][w] = {"max_tokens": max_tokens[w], "levels": rows}
        report["rss_after_run_mib"] = {k: s.rss_mib() for k, s in servers.items()}
    report["total_s"] = time.perf_counter() - started
    report["loadavg_after"] = os.getloadavg()

    print(markdown_table(HEADERS, [r for w in report["workloads"] for r in table_rows(report, w)]))
    md = markdown_report(report)
    print()
    print("\n".join(line for line in md.splitlines() if line.startswith("* ")))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.out_md:
        update_markdown(args.out_md, md)
        print(f"updated {args.out_md}", file=sys.stderr)
    print(f"done in {report['total_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
