"""Server metrics in the Prometheus text format (GET /metrics), without a client library:
request counts by route and status, a latency histogram, queue depth, running rows, generated
tokens and the recent generation rate."""

from __future__ import annotations

import threading
from collections import Counter

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: Counter[str] = Counter()

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[route, status] += 1
            counts = self.latency.setdefault(route, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self.latency_sum[route] += seconds

    def render(self, engines: dict) -> str:
        """The Prometheus exposition text; `engines`: model name -> `infer.batching.Engine`."""
        lines = ["# HELP vlmlab_requests_total HTTP requests answered, by route and status.",
                 "# TYPE vlmlab_requests_total counter"]
        with self.lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'vlmlab_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += ["# HELP vlmlab_request_seconds Request latency (to the last byte).",
                      "# TYPE vlmlab_request_seconds histogram"]
            for route, counts in sorted(self.latency.items()):
                for bound, n in zip(BUCKETS, counts):
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f'vlmlab_request_seconds_bucket{{route="{route}",le="{le}"}} {n}')
                lines.append(f'vlmlab_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
                lines.append(f'vlmlab_request_seconds_count{{route="{route}"}} {counts[-1]}')
        gauges = [("queue_depth", "gauge", "Requests waiting for a batch row.", lambda e: e.queue_depth),
                  ("running", "gauge", "Rows being decoded.", lambda e: e.running),
                  ("generated_tokens_total", "counter", "Tokens generated.", lambda e: e.generated_tokens),
                  ("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
                   lambda e: f"{e.tokens_per_s():.3f}")]
        for name, kind, help_, get in gauges:
            lines += [f"# HELP vlmlab_{name} {help_}", f"# TYPE vlmlab_{name} {kind}"]
            lines += [f'vlmlab_{name}{{model="{m}"}} {get(e)}' for m, e in sorted(engines.items())]
        return "\n".join(lines) + "\n"
