"""Traces written while the simulator runs, so that memory stays bounded however long the
run: `Simulator.run(record=False, sink=...)` hands each node to a sink as it starts.

    sink = tracefile.open_trace("run.json", title)    # or .html / .htm
    result = sim.run(requests, record=False, sink=sink)
    sink.close(result)                                  # the file is complete from here on

ChromeWriter    the Chrome Trace Event Format of `moeflow.sim.trace.to_chrome`, one event per
                line as it happens, into "<path>.part", renamed to <path> by `close`, which
                appends the lanes' names, the requests-in-flight counter and the metrics.
                Lanes are numbered as they first appear; their sort indices put actors in
                natural order and compute before send, as `to_chrome` does.
TimelineWriter  the HTML timeline of `moeflow.sim.trace.to_html`, drawn from a bounded
                window: it keeps only the events of the leading time window that holds the
                first `max_events` to start, and counts the rest (the header says so).

Pure but for the file each writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from moeflow.sim.results import SimResult, TraceEvent
from moeflow.sim.trace import (
    FORMATS, US, _fills, _in_flight, _meta, _resources, _split, _stream_key, _summary,
    _Window, legend_key, page,
)

BUFFER = 1 << 20  # bytes written at a time
DURATIONS_KEPT = 1 << 16  # formatted durations kept for reuse


class ChromeWriter:
    def __init__(self, path: str | os.PathLike[str], title: str = "") -> None:
        self.path = Path(path)
        self.title = title
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.part = self.path.with_name(self.path.name + ".part")
        self.file: IO[str] = self.part.open("w", encoding="utf-8", buffering=BUFFER)
        self.file.write('{"traceEvents":[\n')
        self.write: Callable[[str], Any] = self.file.write
        self.lanes: dict[str, tuple[int, int]] = {}  # resource -> (pid, tid)
        self.pids: dict[str, int] = {}  # actor -> pid
        self.quoted: dict[Any, str] = {}  # names, kinds and layers as JSON
        self.prepared: dict[tuple[Any, ...], tuple[str, str, str]] = {}  # plans share nodes
        self.start = -1.0  # the last event's start, and its "ts"
        self.ts = ""
        self.durs: dict[float, str] = {}  # seconds -> "dur"

    def prepare(self, resource: str, name: str, kind: str, node: int, layer: int | None
                ) -> tuple[str, str, str]:
        """The fixed parts of this node's event line."""
        key = (resource, name, kind, node, layer)
        parts = self.prepared.get(key)
        if parts is None:
            parts = self.prepared[key] = self._parts(*key)
        return parts

    def _parts(self, resource: str, name: str, kind: str, node: int, layer: int | None
               ) -> tuple[str, str, str]:
        lane = self.lanes.get(resource)
        if lane is None:
            actor = _split(resource)[0]
            pid = self.pids.setdefault(actor, len(self.pids) + 1)
            tid = 1 + sum(1 for p, _ in self.lanes.values() if p == pid)
            lane = self.lanes[resource] = (pid, tid)
        quoted = self.quoted
        for x in (name, kind, layer):
            if x not in quoted:
                quoted[x] = json.dumps(x)
        return (f'{{"name":{quoted[name]},"cat":{quoted[kind]},"ph":"X","ts":',
                f',"pid":{lane[0]},"tid":{lane[1]},"args":{{"job":',
                f',"node":{node},"layer":{quoted[layer]}}}}},\n')

    def add(self, lane: tuple[str, str, str], job: int, start: float, end: float) -> None:
        # Times to the nanosecond, as `to_chrome` rounds them (NS_DIGITS). Formatting a float
        # is most of the cost, so each is formatted once: nodes start together in runs, and
        # a run has few distinct durations
        if start != self.start:
            self.start = start
            self.ts = f"{start * US:.3f}"
        dur = self.durs.get(end - start)
        if dur is None:
            if len(self.durs) >= DURATIONS_KEPT:
                self.durs.clear()
            dur = self.durs[end - start] = f"{(end - start) * US:.3f}"
        self.write(f'{lane[0]}{self.ts},"dur":{dur}{lane[1]}{job}{lane[2]}')

    def close(self, result: SimResult) -> None:
        """Append lanes, counter and metrics; the file at `path` is complete."""
        self.finish(_in_flight(result, len(self.pids) + 1), _summary(result.metrics, self.title))

    def finish(self, counters: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Append the lanes' names, `counters` (more trace events) and `summary` (the
        trace's metadata); the file at `path` is complete."""
        meta: list[dict[str, Any]] = []
        resources = _resources(self.lanes)
        actors = list(dict.fromkeys(_split(r)[0] for r in resources))
        for rank, actor in enumerate(actors, 1):
            meta += [_meta("process_name", self.pids[actor], name=actor),
                     _meta("process_sort_index", self.pids[actor], sort_index=rank)]
        for actor in actors:
            streams = sorted((r for r in self.lanes if _split(r)[0] == actor),
                             key=lambda r: _stream_key(_split(r)[1]))
            for rank, r in enumerate(streams, 1):
                pid, tid = self.lanes[r]
                meta += [_meta("thread_name", pid, tid, name=_split(r)[1] or r),
                         _meta("thread_sort_index", pid, tid, sort_index=rank)]
        meta += counters
        tail = ",\n".join(json.dumps(m, separators=(",", ":"), allow_nan=False) for m in meta)
        self.write(tail or '{"name":"trace","ph":"M","pid":0,"tid":0,"args":{}}')
        # every event line ends in a comma: something must follow the last
        self.write('\n],"displayTimeUnit":"ms","metadata":')
        self.write(json.dumps(summary, separators=(",", ":"), allow_nan=False))
        self.write("}\n")
        self.file.close()
        os.replace(self.part, self.path)

    def abort(self) -> None:
        """The run failed: drop what was written."""
        self.file.close()
        self.part.unlink(missing_ok=True)


class TimelineWriter:
    def __init__(self, path: str | os.PathLike[str], title: str = "",
                 max_events: int = 20000) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, not {max_events}")
        self.path = Path(path)
        self.title = title
        self.max_events = max_events
        self.kept: list[TraceEvent] = []  # in start order, as they come
        self.cut: float | None = None  # the start of the last event within max_events
        self.next_start: float | None = None  # the first start after it
        self.resources: set[str] = set()
        self.keys: set[str] = set()
        self.num_events = 0
        self.last = 0.0

    def prepare(self, resource: str, name: str, kind: str, node: int, layer: int | None
                ) -> tuple[str, str, str, int, int | None, str]:
        return resource, name, kind, node, layer, legend_key(kind, name)

    def add(self, lane: tuple[str, str, str, int, int | None, str], job: int, start: float,
            end: float) -> None:
        resource, name, kind, node, layer, key = lane
        self.num_events += 1
        if end > self.last:
            self.last = end
        self.resources.add(resource)
        self.keys.add(key)
        if self.next_start is not None:
            return
        if self.cut is not None and start > self.cut:  # the window is full
            self.next_start = start
            return
        self.kept.append(TraceEvent(resource, name, kind, job, node, layer, start, end))
        if len(self.kept) == self.max_events:
            self.cut = start  # and every later event that starts then

    def window(self) -> _Window:
        """What `moeflow.sim.trace.to_html` would draw of the whole trace."""
        ordered = sorted(self.kept, key=lambda e: (e.start, e.end))
        if not ordered:
            return _Window([], 0.0, 0.0, 0.0, 0)
        start = ordered[0].start
        if self.num_events <= self.max_events:
            return _Window(ordered, start, self.last, self.last, self.num_events)
        shown = ordered[:self.max_events]
        end = (ordered[self.max_events].start if len(ordered) > self.max_events
               else self.next_start)
        assert end is not None  # more events than kept: one started after the cut
        if end <= start:  # they all start together: draw them whole
            end = max(e.end for e in shown)
        return _Window(shown, start, end, self.last, self.num_events)

    def abort(self) -> None:
        self.kept.clear()

    def close(self, result: SimResult) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(page(result, _resources(self.resources), self.window(),
                                  _fills(self.keys), self.title), encoding="utf-8")


def open_trace(path: str | os.PathLike[str], title: str = "") -> ChromeWriter | TimelineWriter:
    """A sink writing `path` as it runs: a Chrome trace (`.json`) or a windowed HTML
    timeline (`.html`, `.htm`)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell which trace to write for {str(path)!r}: "
                         f"the suffix must be one of {', '.join(FORMATS)}")
    return ChromeWriter(path, title) if suffix == ".json" else TimelineWriter(path, title)


__all__ = ["ChromeWriter", "TimelineWriter", "open_trace"]
