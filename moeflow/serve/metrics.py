"""Serving metrics: counters, gauges and latency histograms, rendered in the Prometheus
text format. Updated by the engine thread, read from anywhere (a lock guards them)."""

from __future__ import annotations

import threading
import time
from typing import Any

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.waiting = 0
        self.running = 0
        self.ttft, self.tpot, self.e2e = Histogram(), Histogram(), Histogram()

    def request_started(self, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens

    def token(self) -> None:
        with self.lock:
            self.generated_tokens += 1

    def request_finished(self, final: Any) -> None:
        status = "error" if final.finish_reason.startswith("error") else final.finish_reason
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            if final.completion_tokens:
                self.ttft.observe(final.ttft_s)
                self.e2e.observe(final.e2e_s)
            if final.completion_tokens > 1:
                self.tpot.observe(final.tpot_s)

    def gauge(self, waiting: int, running: int) -> None:
        with self.lock:
            self.waiting, self.running = waiting, running

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            uptime = time.time() - self.started
            return {"uptime_s": uptime, "requests": dict(self.requests),
                    "prompt_tokens": self.prompt_tokens,
                    "generated_tokens": self.generated_tokens,
                    "generated_tokens_per_s": self.generated_tokens / uptime if uptime else 0.0,
                    "waiting": self.waiting, "running": self.running,
                    "ttft_mean_s": self.ttft.sum / self.ttft.total if self.ttft.total else None,
                    "tpot_mean_s": self.tpot.sum / self.tpot.total if self.tpot.total else None,
                    "e2e_mean_s": self.e2e.sum / self.e2e.total if self.e2e.total else None}

    def prometheus(self, extra: dict[str, float] | None = None) -> str:
        lines: list[str] = []
        with self.lock:
            lines += ["# HELP moeflow_requests_total Finished requests by outcome.",
                      "# TYPE moeflow_requests_total counter"]
            for status, n in sorted(self.requests.items()):
                lines.append(f'moeflow_requests_total{{status="{status}"}} {n}')
            for name, value, kind, text in (
                    ("moeflow_prompt_tokens_total", self.prompt_tokens, "counter",
                     "Prompt tokens admitted."),
                    ("moeflow_generated_tokens_total", self.generated_tokens, "counter",
                     "Tokens generated."),
                    ("moeflow_queue_waiting", self.waiting, "gauge",
                     "Requests waiting for their first unit."),
                    ("moeflow_requests_running", self.running, "gauge",
                     "Requests holding KV cache.")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            for name, hist, text in (("moeflow_ttft_seconds", self.ttft, "Time to first token."),
                                     ("moeflow_tpot_seconds", self.tpot, "Time per output token."),
                                     ("moeflow_e2e_seconds", self.e2e, "End-to-end latency.")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
                for bound, count in zip(BUCKETS, hist.counts):
                    lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
                lines += [f'{name}_bucket{{le="+Inf"}} {hist.total}', f"{name}_sum {hist.sum}",
                          f"{name}_count {hist.total}"]
        for name, value in (extra or {}).items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
