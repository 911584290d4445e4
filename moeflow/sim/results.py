"""What a simulated run gives back: per-request timings, metrics, and (when asked for) the
trace of every node it ran; or why it could not finish (SimulationError).

    TraceEvent      one node (or one member of a coalesced group) on one resource
    RequestTiming   arrival, first token and finish of one request
    Metrics         latency percentiles, throughput, utilization and peak memory of a run
    SimResult       all of it; `trace`, `jobs` and `durations` are filled only when the run
                    records them (`Simulator.run(record=True)`)

Pure: plain data and arithmetic.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from moeflow.scheduler.requests import Job


class SimulationError(RuntimeError):
    """The run cannot go on: a deadlock, a model that does not fit, a broken budget."""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    resource: str  # "actor/stream"
    name: str
    kind: str
    job: int
    node: int
    layer: int | None
    start: float
    end: float
    group: int = 0  # nodes coalesced into one kernel share a group id
    ready_order: int = 0  # when it became ready and started, in event order (ties in time
    start_order: int = 0  # are ordered too: a zero-duration node finishes "after" a start)


@dataclass(frozen=True, slots=True)
class RequestTiming:
    seq_id: int
    arrival: float
    first_token: float
    finish: float
    prompt: int
    output: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / (self.output - 1) if self.output > 1 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def busy_of(trace: Iterable[TraceEvent]) -> dict[str, float]:
    """Seconds each resource was busy: every kernel once (a coalesced group is one kernel),
    summed in trace order, as the simulator accumulates them while it runs."""
    busy: dict[str, float] = {}
    seen: set[tuple[str, int]] = set()
    for ev in trace:
        if ev.group:
            if (ev.resource, ev.group) in seen:
                continue
            seen.add((ev.resource, ev.group))
        busy[ev.resource] = busy.get(ev.resource, 0.0) + ev.end - ev.start
    return busy


@dataclass
class Metrics:
    num_requests: int
    makespan: float
    output_tokens: int
    throughput: float  # output tokens / s
    request_rate: float  # finished requests / s
    ttft: dict[str, float]
    tpot: dict[str, float]
    e2e: dict[str, float]
    utilization: dict[str, float]
    peak_memory: dict[str, float]
    memory_budget: dict[str, float]
    num_preemptions: int = 0

    @staticmethod
    def of(timings: Sequence[RequestTiming], busy: Mapping[str, float],
           peak: dict[str, float], budget: dict[str, float], preemptions: int) -> Metrics:
        """The metrics of a run from its timings and each resource's busy seconds
        (`busy_of(trace)` for a recorded trace)."""
        start = min((t.arrival for t in timings), default=0.0)
        end = max((t.finish for t in timings), default=0.0)
        span = max(end - start, 1e-12)

        def stats(values: list[float]) -> dict[str, float]:
            return {"p50": percentile(values, 50), "p90": percentile(values, 90),
                    "p99": percentile(values, 99),
                    "mean": statistics.fmean(values) if values else float("nan")}

        tokens = sum(t.output for t in timings)
        return Metrics(
            len(timings), span, tokens, tokens / span, len(timings) / span,
            stats([t.ttft for t in timings]),
            stats([t.tpot for t in timings if t.output > 1]),
            stats([t.e2e for t in timings]),
            {r: b / span for r, b in sorted(busy.items(), key=lambda rb: _natural(rb[0]))},
            peak, budget, preemptions)

    def table(self) -> str:
        ms = 1e3
        lines = [
            f"requests            {self.num_requests}",
            f"makespan            {self.makespan:.3f} s",
            f"throughput          {self.throughput:.1f} output tok/s, "
            f"{self.request_rate:.2f} req/s",
        ]

        def shown(seconds: float) -> str:  # a percentile of no values (TPOT when every
            # request makes one token) is NaN: shown as "-", not "nan ms"
            return f"{seconds * ms:9.2f} ms" if seconds == seconds else f"{'-':>9s}   "

        for name, st in (("TTFT", self.ttft), ("TPOT", self.tpot), ("end-to-end", self.e2e)):
            lines.append(f"{name:19s} p50 {shown(st['p50'])}   p90 {shown(st['p90'])}"
                         f"   p99 {shown(st['p99'])}")
        lines.append("utilization         " + "  ".join(
            f"{r} {u:.0%}" for r, u in self.utilization.items()))
        lines.append("peak memory         " + "  ".join(
            f"{d} {self.peak_memory[d] / 1e9:.1f}/{self.memory_budget[d] / 1e9:.1f} GB"
            for d in self.peak_memory))
        if self.num_preemptions:
            lines.append(f"preemptions         {self.num_preemptions}")
        return "\n".join(lines)


def _natural(text: str) -> tuple[str | int, ...]:
    """'cuda:10' -> ('cuda:', 10, ''): cuda:2 before cuda:10, as the traces order them."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", text)))


@dataclass
class SimResult:
    trace: list[TraceEvent]  # empty unless recorded
    timings: list[RequestTiming]
    metrics: Metrics
    jobs: list[Job]  # by plan index; empty unless recorded
    durations: dict[tuple[int, int], float] = field(default_factory=dict)  # (job, node) -> s
    memory_violations: list[str] = field(default_factory=list)
    num_events: int = 0  # nodes run, recorded or not
    num_units: int = 0
    # layer -> kernel -> routed Expert groups run on it, as the scheduler's on_routing chose
    # (empty for a policy without on_routing)
    kernels: dict[int, dict[str, int]] = field(default_factory=dict)

    def stream_orders(self) -> dict[str, list[tuple[int, int]]]:
        """Per resource, the (job, node) it ran, in start order (of a recorded trace)."""
        out: dict[str, list[tuple[int, int]]] = {}
        for ev in sorted(self.trace, key=lambda e: (e.start, e.end)):
            out.setdefault(ev.resource, []).append((ev.job, ev.node))
        return out
