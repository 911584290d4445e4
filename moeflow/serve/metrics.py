"""Serving metrics: counters, gauges and latency histograms, rendered in the Prometheus
text format under vLLM's names with the `moeflow:` prefix (`vllm:num_requests_running` is
`moeflow:num_requests_running`). Updated by the engine thread and the server, read from
anywhere (a lock guards them)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10  # generated_tokens_per_s counts the tokens of the last 10 s


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


class Rate:
    """Events per second over a sliding window of whole seconds: one bucket per second,
    reused as the window moves (O(window) to read, O(1) to add; not thread-safe alone)."""

    def __init__(self, window_s: int = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.counts = [0] * window_s
        self.seconds = [-1] * window_s  # the second each bucket counts

    def add(self, now: float, n: int = 1) -> None:
        second = int(now)
        i = second % self.window_s
        if self.seconds[i] != second:
            self.seconds[i], self.counts[i] = second, 0
        self.counts[i] += n

    def per_s(self, now: float, since: float) -> float:
        """The rate over the window ending at `now` (shorter when `since`, the start of
        counting, is later than the window's start)."""
        second = int(now)
        total = sum(count for count, s in zip(self.counts, self.seconds)
                    if second - self.window_s < s <= second)
        span = min(now - (second - self.window_s + 1), now - since)
        return total / span if span > 0 else 0.0


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        self.started = clock()
        self.requests: dict[str, int] = {}  # finished, by finish reason ("error" for all)
        self.rejected_by_code: dict[str, int] = {}  # answered with an error reply, by code
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.token_rate = Rate()
        self.waiting = 0
        self.running = 0
        self.preemptions = 0  # requests preempted (KV dropped, recomputed later)
        self.retries = 0  # requests run again after losing their actor
        self.ttft, self.tpot, self.e2e = Histogram(), Histogram(), Histogram()

    def request_started(self, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens

    def token(self) -> None:
        now = self.clock()
        with self.lock:
            self.generated_tokens += 1
            self.token_rate.add(now)

    def request_finished(self, final: Any) -> None:
        status = "error" if final.finish_reason.startswith("error") else final.finish_reason
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            if final.completion_tokens:
                self.ttft.observe(final.ttft_s)
                self.e2e.observe(final.e2e_s)
            if final.completion_tokens > 1:
                self.tpot.observe(final.tpot_s)

    def rejected(self, code: str) -> None:
        """A request was answered with an error reply of this code (not a final)."""
        with self.lock:
            self.rejected_by_code[code] = self.rejected_by_code.get(code, 0) + 1

    def gauge(self, waiting: int, running: int) -> None:
        with self.lock:
            self.waiting, self.running = waiting, running

    def recomputed(self, preemptions: int, retries: int) -> None:
        """Add this many preemptions and retries (see EngineCore.num_retries)."""
        with self.lock:
            self.preemptions += preemptions
            self.retries += retries

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        with self.lock:
            return {"uptime_s": now - self.started, "requests": dict(self.requests),
                    "rejected": dict(self.rejected_by_code),
                    "prompt_tokens": self.prompt_tokens,
                    "generated_tokens": self.generated_tokens,
                    "generated_tokens_per_s": self.token_rate.per_s(now, self.started),
                    "waiting": self.waiting, "running": self.running,
                    "preemptions": self.preemptions, "retries": self.retries,
                    "ttft_mean_s": self.ttft.sum / self.ttft.total if self.ttft.total else None,
                    "tpot_mean_s": self.tpot.sum / self.tpot.total if self.tpot.total else None,
                    "e2e_mean_s": self.e2e.sum / self.e2e.total if self.e2e.total else None}

    def prometheus(self, extra: dict[str, float] | None = None) -> str:
        """The Prometheus text format; `extra` adds gauges (name -> value)."""
        lines: list[str] = []
        with self.lock:
            for name, label, counts, text in (
                    ("moeflow:request_success_total", "finished_reason", self.requests,
                     "Finished requests by finish reason (error: the engine failed them)."),
                    ("moeflow:request_rejected_total", "code", self.rejected_by_code,
                     "Requests answered with an error reply, by error code.")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
                lines += [f'{name}{{{label}="{key}"}} {n}' for key, n in sorted(counts.items())]
            for name, value, kind, text in (
                    ("moeflow:prompt_tokens_total", self.prompt_tokens, "counter",
                     "Prompt tokens admitted."),
                    ("moeflow:generation_tokens_total", self.generated_tokens, "counter",
                     "Tokens generated."),
                    ("moeflow:num_preemptions_total", self.preemptions, "counter",
                     "Requests preempted: their KV cache dropped, to be recomputed (a "
                     "device's cache was full, or an actor was lost)."),
                    ("moeflow:request_retries_total", self.retries, "counter",
                     "Requests run again after losing their actor (it died or stopped "
                     "answering, or a message was lost)."),
                    ("moeflow:num_requests_waiting", self.waiting, "gauge",
                     "Admitted requests without KV cache (not started, or preempted)."),
                    ("moeflow:num_requests_running", self.running, "gauge",
                     "Requests holding KV cache.")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            for name, hist, text in (
                    ("moeflow:time_to_first_token_seconds", self.ttft,
                     "Time from admission to the first token."),
                    ("moeflow:request_time_per_output_token_seconds", self.tpot,
                     "Each request's mean time per output token after the first."),
                    ("moeflow:e2e_request_latency_seconds", self.e2e,
                     "Time from admission to the end of the request.")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
                for bound, count in zip(BUCKETS, hist.counts):
                    lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
                lines += [f'{name}_bucket{{le="+Inf"}} {hist.total}', f"{name}_sum {hist.sum}",
                          f"{name}_count {hist.total}"]
        for name, reading in (extra or {}).items():
            lines += [f"# TYPE {name} gauge", f"{name} {reading}"]
        return "\n".join(lines) + "\n"
