"""The event lines of a Chrome trace, formatted in a process of their own.

Formatting a node's line (two times in microseconds and its lane's fixed parts) costs the
simulator about as much as running the node, so `moeflow.sim.tracefile.ChromeWriter` hands
the numbers to a child process, which formats and writes them on another core:

    python -m moeflow.sim.tracelines  < messages  >> trace.json.part

Its stdin carries messages of a kind byte, a payload length (8 bytes, little-endian) and
the payload:

    b"L"  lanes: a JSON list of [head, middle, tail] strings, numbered on from the lanes
          before; an event's line is head + ts + ',"dur":' + dur + middle + job + tail
    b"E"  events: float64 quadruples (lane, job, start, end), times in seconds

Its stdout is the trace file, open for appending; it writes each event's line in the order
received and exits 0 at the end of its input. It imports nothing of moeflow, so it starts
in a few tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from collections.abc import Callable
from typing import Any, BinaryIO

US = 1e6  # Chrome trace times are in microseconds (moeflow.sim.trace uses this one)
BUFFER = 1 << 20  # bytes written at a time
DURATIONS_KEPT = 1 << 16  # formatted durations kept for reuse
JOBS_KEPT = 1 << 16  # formatted job numbers kept for reuse
HEADER = 9  # kind, length
LANES, EVENTS = b"L", b"E"


class Lines:
    """Formats event lines into `write`. Times to the nanosecond, as `to_chrome` rounds them
    (NS_DIGITS). Formatting a float is most of the cost, so each is formatted once: nodes
    start together in runs, and a run has few distinct durations."""

    def __init__(self, write: Callable[[str], Any]) -> None:
        self.write = write
        self.lanes: list[tuple[str, str, str]] = []
        self.start = -1.0  # the last event's start, and its "ts"
        self.ts = ""
        self.durs: dict[float, str] = {}  # seconds -> "dur"
        self.jobs: dict[float, str] = {}  # job -> its number as written

    def add_lanes(self, lanes: list[tuple[str, str, str]]) -> None:
        self.lanes.extend(map(tuple, lanes))  # type: ignore[arg-type]

    def add(self, events: array[float]) -> None:
        """Write the events of `events`, flat (lane, job, start, end) quadruples, in one
        write."""
        lanes, durs, jobs = self.lanes, self.durs, self.jobs
        out: list[str] = []
        line = out.append
        last, ts = self.start, self.ts
        it = iter(events)
        for lane, job, start, end in zip(it, it, it, it):
            if start != last:
                last = start
                ts = f"{start * US:.3f}"
            dur = durs.get(end - start)
            if dur is None:
                if len(durs) >= DURATIONS_KEPT:
                    durs.clear()
                dur = durs[end - start] = f"{(end - start) * US:.3f}"
            parts = lanes[int(lane)]
            number = jobs.get(job)
            if number is None:
                if len(jobs) >= JOBS_KEPT:
                    jobs.clear()
                number = jobs[job] = str(int(job))
            line(f'{parts[0]}{ts},"dur":{dur}{parts[1]}{number}{parts[2]}')
        self.start, self.ts = last, ts
        self.write("".join(out))


def message(kind: bytes, payload: bytes) -> bytes:
    return kind + len(payload).to_bytes(HEADER - 1, "little") + payload


def serve(source: BinaryIO, write: Callable[[str], Any]) -> None:
    """Format every message of `source` until its end."""
    lines = Lines(write)
    while True:
        header = source.read(HEADER)
        if not header:
            return
        if len(header) != HEADER:
            raise ValueError("the trace's input ended inside a message header")
        kind, size = header[:1], int.from_bytes(header[1:], "little")
        payload = source.read(size)
        if len(payload) != size:
            raise ValueError(f"the trace's input ended inside a message ({len(payload)} of "
                             f"{size} bytes)")
        if kind == LANES:
            lines.add_lanes(json.loads(payload))
        elif kind == EVENTS:
            events = array("d")
            events.frombytes(payload)
            lines.add(events)
        else:
            raise ValueError(f"unknown trace message kind {kind!r}")


def main() -> int:
    with os.fdopen(sys.stdout.fileno(), "w", encoding="utf-8", buffering=BUFFER,
                   closefd=False) as out:
        serve(sys.stdin.buffer, out.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
