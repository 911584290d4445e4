"""Traces written while the simulator runs, so that memory stays bounded however long the
run: `Simulator.run(record=False, sink=...)` hands each node to a sink as it starts.

    sink = tracefile.open_trace("run.json", title)    # or .html / .htm
    result = sim.run(requests, record=False, sink=sink)
    sink.close(result)                                  # the file is complete from here on

ChromeWriter    the Chrome Trace Event Format of `moeflow.sim.trace.to_chrome`, one event per
                line as it happens, into "<path>.part", renamed to <path> by `close`, which
                appends the lanes' names, the requests-in-flight counter and the metrics.
                Lanes are numbered as they first appear; their sort indices put actors in
                natural order and compute before send, as `to_chrome` does. The event
                lines are formatted by a child process on another core
                (`moeflow.sim.tracelines`): the run hands it four numbers per node.
TimelineWriter  the HTML timeline of `moeflow.sim.trace.to_html`, drawn from a bounded
                window: it keeps only the events of the leading time window that holds the
                first `max_events` to start, and counts the rest (the header says so).

Pure but for the file each writes (and the process that formats a Chrome trace's lines).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path
from typing import Any

from moeflow.sim.results import SimResult, TraceEvent
from moeflow.sim.trace import (
    FORMATS, _fills, _in_flight, _meta, _resources, _split, _stream_key, _summary,
    _Window, legend_key, page,
)
from moeflow.sim.tracelines import EVENTS, LANES, message


class ChromeWriter:
    """See the module docstring. The event lines are formatted by a child process
    (`moeflow.sim.tracelines`) on another core; `add` hands it the numbers."""

    def __init__(self, path: str | os.PathLike[str], title: str = "") -> None:
        self.path = Path(path)
        self.title = title
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.part = self.path.with_name(self.path.name + ".part")
        with self.part.open("w", encoding="utf-8") as file:
            file.write('{"traceEvents":[\n')
        self.lines = _LineWriter(self.part)
        self.lanes: dict[str, tuple[int, int]] = {}  # resource -> (pid, tid)
        self.pids: dict[str, int] = {}  # actor -> pid
        self.quoted: dict[Any, str] = {}  # names, kinds and layers as JSON
        self.prepared: dict[tuple[Any, ...], int] = {}  # plans share nodes -> lane number
        self.fresh: list[tuple[str, str, str]] = []  # lanes the formatter has not been sent

    def prepare(self, resource: str, name: str, kind: str, node: int, layer: int | None
                ) -> int:
        """The number of this node's lane: the fixed parts of its event line."""
        key = (resource, name, kind, node, layer)
        lane = self.prepared.get(key)
        if lane is None:
            lane = self.prepared[key] = len(self.prepared)
            self.fresh.append(self._parts(*key))
        return lane

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

    def add(self, events: list[Any]) -> None:
        """Nodes that ran, as flat (lane, job, start, end) quadruples (see TraceSink)."""
        if self.fresh:
            self.lines.send(LANES, json.dumps(self.fresh).encode())
            self.fresh = []
        if events:
            self.lines.send(EVENTS, array("d", events).tobytes())

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
        try:  # every line written
            self.add([])
            self.lines.close()
        except Exception:
            self.abort()  # no part file left behind
            raise
        with self.part.open("a", encoding="utf-8") as file:
            file.write(tail or '{"name":"trace","ph":"M","pid":0,"tid":0,"args":{}}')
            # every event line ends in a comma: something must follow the last
            file.write('\n],"displayTimeUnit":"ms","metadata":')
            file.write(json.dumps(summary, separators=(",", ":"), allow_nan=False))
            file.write("}\n")
        os.replace(self.part, self.path)

    def abort(self) -> None:
        """The run failed: drop what was written."""
        self.lines.kill()
        self.part.unlink(missing_ok=True)


class _LineWriter:
    """The child process that formats event lines onto the end of `part`
    (`moeflow.sim.tracelines`), and the pipe to it."""

    def __init__(self, part: Path) -> None:
        root = str(Path(__file__).resolve().parents[2])  # where moeflow imports from
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.errors = tempfile.TemporaryFile()
        with part.open("ab") as out:
            self.child = subprocess.Popen(
                [sys.executable, "-m", "moeflow.sim.tracelines"], stdin=subprocess.PIPE,
                stdout=out, stderr=self.errors, env=env, bufsize=0)  # a message, a write
        assert self.child.stdin is not None
        self.pipe = self.child.stdin

    def send(self, kind: bytes, payload: bytes) -> None:
        try:
            self.pipe.write(message(kind, payload))
        except (BrokenPipeError, ValueError):  # it exited, or the pipe was closed
            raise RuntimeError(f"the trace's line writer exited early{self._said()}") from None

    def close(self) -> None:
        """Wait for every line to be written; raise if the writer failed."""
        with contextlib.suppress(BrokenPipeError):
            self.pipe.close()
        code = self.child.wait()
        if code != 0:
            raise RuntimeError(f"the trace's line writer failed (exit status {code})"
                               f"{self._said()}")
        self.errors.close()

    def _said(self) -> str:
        """The last line the writer wrote to stderr, if any, as ": <line>"."""
        if self.errors.closed:
            return ""
        self.errors.seek(0)
        said = self.errors.read().decode(errors="replace").strip()
        return f": {said.splitlines()[-1]}" if said else ""

    def kill(self) -> None:
        self.child.kill()
        with contextlib.suppress(BrokenPipeError):
            self.pipe.close()
        self.child.wait()
        self.errors.close()


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

    def add(self, events: list[Any]) -> None:
        """Nodes that ran, as flat (lane, job, start, end) quadruples (see TraceSink)."""
        it = iter(events)
        for lane, job, start, end in zip(it, it, it, it):
            resource, name, kind, node, layer, key = lane
            self.num_events += 1
            if end > self.last:
                self.last = end
            self.resources.add(resource)
            self.keys.add(key)
            if self.next_start is not None:
                continue
            if self.cut is not None and start > self.cut:  # the window is full
                self.next_start = start
                continue
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
