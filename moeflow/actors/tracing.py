"""Traces of real runs: every node the actors ran, on its stream's lane, as a Chrome trace.

    moeflow generate MODEL --prompt hi --trace run.json     # EngineConfig(trace="run.json")
    InProcessExecutor(workers, trace="run.json")            # or ZmqExecutor(..., trace=...)

Open the file in https://ui.perfetto.dev or chrome://tracing. It reads like the
simulator's (`moeflow simulate --trace`): a process per actor, a lane per stream, each
node's name, kind, layer and job.

How it is measured. With a trace asked for, the coordinator marks every RunUnit `trace`.
Each actor then times the node groups it runs and notes when it hears of each other
actor's node (a Data or Done message taken in), with `time.monotonic()`, one clock for
every process of a host, and returns both with its UnitPart. When a job is over, the
coordinator writes its nodes, a line each:

- a node run by an actor spans its run (the members of a coalesced group share one span);
- between actor processes, a Transfer spans from its start on the sender to when its
  receiver took it in (the last of them, for a dispatch or combine to several): the bytes
  move on ZeroMQ's I/O thread while the sender's core thread goes on computing, so a send
  lane overlapping the compute lane beside it is real overlap (`send_overlap` measures
  it). The span is an upper bound on the wire time: a
  receiver busy computing takes a message in after its current node. In one process a
  Transfer hands its tensors over by reference, and spans its run alone.

Memory: spans are held per job in flight, and written when the job ends; the file is
complete when the executor closes. On disk a node is a line of about 150 bytes: a trace
stops writing after `max_nodes` (2 million by default) and counts the rest, so a server
left tracing does not fill its disk; a trace that cannot be written stops, and says so in
the log, without failing any request. A failed job shows the nodes of the actors that had
finished their share; the failing actor's are not returned. Actors on other hosts have
other clocks: their transfers' ends are not comparable there.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeflow.actors.messages import UnitPart
from moeflow.dataflow.graph import Transfer
from moeflow.scheduler.plan import Plan
from moeflow.sim.replay import TraceColumns
from moeflow.sim.trace import US
from moeflow.sim.tracefile import ChromeWriter

PLANS_KEPT = 64  # plans whose lanes are kept for the next job of the same plan
MAX_NODES = 2_000_000  # nodes written at most (about 300 MB); beyond, counted, not written
log = logging.getLogger("moeflow.trace")


class _Coverage:
    """The time a lane was busy: the length of the union of its spans, which may overlap
    (a coalesced group's members share one; transfers in flight together) and come in any
    order. Spans that end before every job still open began are folded into a total: no
    later span can reach back to them."""

    def __init__(self) -> None:
        self.folded = 0.0
        self.spans: list[list[float]] = []  # disjoint [start, end], sorted

    def add(self, start: float, end: float) -> None:
        spans = self.spans
        i = bisect.bisect_left(spans, [start, start])
        if i and spans[i - 1][1] >= start:
            i -= 1
        j = i
        while j < len(spans) and spans[j][0] <= end:
            start, end = min(start, spans[j][0]), max(end, spans[j][1])
            j += 1
        spans[i:j] = [[start, end]]

    def fold(self, before: float) -> None:
        spans = self.spans
        done = 0
        while done < len(spans) and spans[done][1] < before:
            self.folded += spans[done][1] - spans[done][0]
            done += 1
        del spans[:done]

    def total(self) -> float:
        return self.folded + sum(end - start for start, end in self.spans)


@dataclass
class _Job:
    plan: Plan
    began: float  # since the trace's time zero: none of its spans starts before
    spans: list[tuple[int, float, float]] = field(default_factory=list)
    # a transfer -> when the last of its destinations heard of it
    arrivals: dict[int, float] = field(default_factory=dict)


class RealTrace:
    """Collects the spans actors return and writes each finished job's (see the module
    docstring). `begin` a job as it is submitted, `part` each UnitPart, `end` it when it is
    over; `close` completes the file."""

    def __init__(self, path: str | os.PathLike[str], title: str = "",
                 transfers_until_arrival: bool = True, max_nodes: int = MAX_NODES) -> None:
        if Path(path).suffix.lower() != ".json":
            raise ValueError(f"a trace of a real run is a Chrome trace: give a path ending in "
                             f".json, not {str(path)!r}")
        self.writer = ChromeWriter(path, title)
        self.path = self.writer.path
        self.title = title
        self.until_arrival = transfers_until_arrival
        self.origin = time.monotonic()  # the trace's time zero
        self.jobs: dict[int, _Job] = {}
        self.lanes: OrderedDict[int, tuple[Plan, list[Any]]] = OrderedDict()  # id(plan) ->
        self.busy: dict[str, _Coverage] = {}  # lane -> when its nodes ran
        self.first: float | None = None  # the earliest start written, the latest end
        self.last: float | None = None
        self.max_nodes = max_nodes
        self.num_jobs = self.num_nodes = self.num_dropped = self.num_bad = 0
        self.closed = False

    def begin(self, job_id: int, plan: Plan) -> None:
        if not self.closed:
            self.jobs[job_id] = _Job(plan, time.monotonic() - self.origin)

    def part(self, msg: UnitPart) -> None:
        job = self.jobs.get(msg.unit_id)
        if job is None:
            return
        job.spans.extend(msg.spans)
        nodes = job.plan.graph.nodes
        for node, when in msg.arrivals:  # a transfer's: when its destinations took it in
            if (0 <= node < len(nodes) and isinstance(nodes[node], Transfer)
                    and msg.actor in nodes[node].dsts  # type: ignore[attr-defined]
                    and when > job.arrivals.get(node, -math.inf)):  # the last of them
                job.arrivals[node] = when

    def end(self, job_id: int) -> None:
        """The job is over (done or failed): write its nodes. A trace that cannot be
        written (a full disk, say) stops tracing and says so once; it never fails a job."""
        job = self.jobs.pop(job_id, None)
        if job is None or self.closed:
            return
        try:
            self._write(job_id, job)
        except Exception as exc:
            log.error("the trace %s cannot be written (%s): tracing stops", self.path, exc)
            self.closed = True
            self.jobs.clear()
            with contextlib.suppress(Exception):
                self.writer.abort()

    def _write(self, job_id: int, job: _Job) -> None:
        plan = job.plan
        lanes = self._lanes(plan)
        nodes = plan.graph.nodes
        origin, arrivals = self.origin, job.arrivals
        written: list[Any] = []  # (lane, job, start, end) per node, for the writer
        for node_id, start, end in job.spans:
            if not (0 <= node_id < len(nodes) and math.isfinite(start) and end >= start):
                self.num_bad += 1  # not a span of this plan: nothing to draw
                continue
            if self.until_arrival and isinstance(nodes[node_id], Transfer):
                end = max(end, arrivals.get(node_id, end))
            start, end = start - origin, end - origin
            if self.num_nodes >= self.max_nodes:
                if not self.num_dropped:
                    log.warning("the trace %s holds %d nodes: later ones are counted, not "
                                "written", self.path, self.max_nodes)
                self.num_dropped += 1
                continue
            written += (lanes[node_id], job_id, start, end)
            self.num_nodes += 1
            resource = self._resource(plan, node_id)
            coverage = self.busy.get(resource)
            if coverage is None:
                coverage = self.busy[resource] = _Coverage()
            coverage.add(start, end)
            self.first = start if self.first is None else min(self.first, start)
            self.last = end if self.last is None else max(self.last, end)
        self.writer.add(written)
        self.num_jobs += 1
        before = min((j.began for j in self.jobs.values()),
                     default=time.monotonic() - origin)
        for coverage in self.busy.values():
            coverage.fold(before)

    @staticmethod
    def _resource(plan: Plan, node_id: int) -> str:
        stream = plan.assignment[node_id]
        return f"{stream.actor}/{stream.name}"

    def _lanes(self, plan: Plan) -> list[Any]:
        kept = self.lanes.get(id(plan))
        if kept is not None and kept[0] is plan:
            self.lanes.move_to_end(id(plan))
            return kept[1]
        shown = TraceColumns.of(plan)
        lanes = [self.writer.prepare(self._resource(plan, i), shown.name[i], shown.kind[i], i,
                                     shown.layer[i]) for i in range(len(plan.graph.nodes))]
        self.lanes[id(plan)] = (plan, lanes)  # the plan held: its id is not reused meanwhile
        if len(self.lanes) > PLANS_KEPT:
            self.lanes.popitem(last=False)
        return lanes

    def summary(self) -> dict[str, Any]:
        span = 0.0 if self.first is None or self.last is None else self.last - self.first
        return {"title": self.title, "source": "real run", "num_jobs": self.num_jobs,
                "num_nodes": self.num_nodes, "nodes_not_written": self.num_dropped,
                "bad_spans": self.num_bad, "span_s": span,
                "utilization": {r: (b.total() / span if span > 0 else 0.0)
                                for r, b in sorted(self.busy.items())}}

    def close(self) -> None:
        """Write the jobs still open as they stand, and complete the file."""
        if self.closed:
            return
        for job_id in list(self.jobs):
            self.end(job_id)
        if self.closed:  # writing failed on the way
            return
        self.closed = True
        try:
            self.writer.finish([], self.summary())
        except Exception as exc:
            log.error("the trace %s cannot be completed: %s", self.path, exc)
            with contextlib.suppress(Exception):
                self.writer.abort()


def read_lanes(path: str | os.PathLike[str]) -> dict[str, list[tuple[float, float]]]:
    """The spans of a Chrome trace (a real run's or a simulated one), by lane
    ("actor/stream"), in microseconds, sorted by start."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    events = data["traceEvents"]
    actors = {e["pid"]: e["args"]["name"] for e in events
              if e.get("ph") == "M" and e["name"] == "process_name"}
    streams = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e["name"] == "thread_name"}
    lanes: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("ph") == "X":
            lane = f"{actors[e['pid']]}/{streams[(e['pid'], e['tid'])]}"
            lanes.setdefault(lane, []).append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    for spans in lanes.values():
        spans.sort()
    return lanes


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in spans)


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """The length of the intersection of two disjoint sorted interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if high > low:
            total += high - low
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def send_overlap(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Per actor of a trace: seconds its compute lane was busy, its send lane was busy, and
    both at once (sends hidden behind compute)."""
    lanes = read_lanes(path)
    out: dict[str, dict[str, float]] = {}
    for actor in sorted({lane.rpartition("/")[0] for lane in lanes}):
        compute = _union(lanes.get(f"{actor}/compute", []))
        send = _union(lanes.get(f"{actor}/send", []))
        out[actor] = {"compute_s": _length(compute) / US, "send_s": _length(send) / US,
                      "overlap_s": _intersect(compute, send) / US}
    return out


__all__ = ["RealTrace", "read_lanes", "send_overlap"]
