"""Pictures of a simulated run over time: a Chrome trace, or one self-contained HTML timeline.

Both draw `SimResult.trace` with one lane per resource. A resource is "actor/stream"
("cuda:3/send"); actors come in natural order (cuda:2 before cuda:10), and within an actor
the compute stream comes first, then send, recv and the rest.

    to_chrome(result)              Chrome Trace Event Format, a dict ready for JSON; open it in
                                   https://ui.perfetto.dev or chrome://tracing. Each actor is
                                   a process (pid), each of its streams a thread (tid), each
                                   event a complete event ("ph": "X", ts and dur in µs to the
                                   ns) named after its node, with its kind as category and
                                   job, node and layer as args. A counter tracks requests in
                                   flight, and "metadata" holds the title and the run's metrics
    to_html(result)                an inline SVG timeline, no scripts and no network: time
                                   across, a lane per resource, each event a bar coloured by
                                   its kind (the colours of `moeflow.dataflow.render`) with its
                                   record as a tooltip, under a header of metrics and a legend.
                                   Past `max_events` events, only the leading time window that
                                   holds that many is drawn, and the header says so
    write(result, "run.json")      picks the format by suffix

These draw a recorded trace held in memory; `moeflow.sim.tracefile` writes the same two
while the simulator runs, holding nothing per event.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeflow.dataflow.render import _CSS, _MONO, KIND_FILLS, _band_tint, _x
from moeflow.sim.simulator import Metrics, SimResult, TraceEvent
from moeflow.sim.tracelines import US  # Chrome trace times are in microseconds

FORMATS = (".json", ".html", ".htm")
STREAM_ORDER = ("compute", "send", "recv")  # then any other stream, in natural order
OTHER_FILLS = ("#fee391", "#bcbddc", "#fc9272", "#9ebcda", "#d9d9d9")  # kinds render lacks
NS_DIGITS = 3  # written to the nanosecond, a trace viewer's resolution (17 digits cost 2x)


def to_chrome(result: SimResult, title: str = "") -> dict[str, Any]:
    """The Chrome Trace Event Format of `result`: one process per actor, a thread per stream."""
    resources = _resources(e.resource for e in result.trace)
    actors = list(dict.fromkeys(_split(r)[0] for r in resources))
    pid = {a: i + 1 for i, a in enumerate(actors)}
    meta: list[dict[str, Any]] = []
    for a in actors:
        meta += [_meta("process_name", pid[a], name=a),
                 _meta("process_sort_index", pid[a], sort_index=pid[a])]
    lane: dict[str, tuple[int, int]] = {}
    for r in resources:
        actor, stream = _split(r)
        tid = sum(1 for p, _ in lane.values() if p == pid[actor]) + 1
        lane[r] = (pid[actor], tid)
        meta += [_meta("thread_name", pid[actor], tid, name=stream or r),
                 _meta("thread_sort_index", pid[actor], tid, sort_index=tid)]
    events = [{"name": e.name, "cat": e.kind, "ph": "X", "ts": round(e.start * US, NS_DIGITS),
               "dur": round((e.end - e.start) * US, NS_DIGITS), "pid": lane[e.resource][0],
               "tid": lane[e.resource][1],
               "args": {"job": e.job, "node": e.node, "layer": e.layer}}
              for e in result.trace]
    return {"traceEvents": meta + _in_flight(result, len(actors) + 1) + events,
            "displayTimeUnit": "ms", "metadata": _summary(result.metrics, title)}


def write_chrome(result: SimResult, path: str | os.PathLike[str], title: str = "") -> None:
    """Write the Chrome trace of `result` as JSON to `path`, making its folder."""
    _write(path, json.dumps(to_chrome(result, title), separators=(",", ":"), allow_nan=False))


def to_html(result: SimResult, title: str = "", max_events: int = 20000) -> str:
    """A self-contained HTML page: header with metrics and legend, and an SVG timeline."""
    if max_events < 1:
        raise ValueError(f"max_events must be at least 1, not {max_events}")
    return page(result, _resources(e.resource for e in result.trace),
                _window(result.trace, max_events), _fills(_key(e) for e in result.trace), title)


def page(result: SimResult, resources: list[str], window: _Window, fills: dict[str, str],
         title: str = "") -> str:
    """The HTML timeline of `window`, with lanes for `resources` (in lane order) and the
    legend `fills`, under a header of the run's metrics."""
    heading = title or "moeflow simulated timeline"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_x(heading)}</title>\n<style>{_CSS}{_TIMELINE_CSS}</style>\n</head>\n"
            f"<body>\n{_header(result, resources, window, fills, heading)}\n"
            f'<div class="canvas">\n{_svg(resources, window, fills)}\n</div>\n</body>\n</html>\n')


def write_timeline(result: SimResult, path: str | os.PathLike[str], title: str = "",
                   max_events: int = 20000) -> None:
    """Write the HTML timeline of `result` to `path`, making its folder."""
    _write(path, to_html(result, title, max_events))


def write(result: SimResult, path: str | os.PathLike[str], title: str = "") -> None:
    """Write a Chrome trace (`.json`) or an HTML timeline (`.html`, `.htm`) to `path`."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell which trace to write for {str(path)!r}: "
                         f"the suffix must be one of {', '.join(FORMATS)}")
    if suffix == ".json":
        write_chrome(result, path, title)
    else:
        write_timeline(result, path, title)


def _write(path: str | os.PathLike[str], text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# -- lanes and Chrome records ----------------------------------------------------------


def _natural(text: str) -> tuple[str | int, ...]:
    """'cuda:10' -> ('cuda:', 10, ''): runs of digits compare as numbers."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", text)))


def _split(resource: str) -> tuple[str, str]:
    """'cuda:3/send' -> ('cuda:3', 'send'); a resource without a stream is its own actor."""
    actor, slash, stream = resource.rpartition("/")
    return (actor, stream) if slash else (resource, "")


def _resources(names: Iterable[str]) -> list[str]:
    """Distinct resources in lane order: actors naturally, then compute, send, recv, rest."""
    def key(resource: str) -> tuple[Any, ...]:
        actor, stream = _split(resource)
        return _natural(actor), _stream_key(stream)
    return sorted(set(names), key=key)


def _stream_key(stream: str) -> tuple[Any, ...]:
    rank = STREAM_ORDER.index(stream) if stream in STREAM_ORDER else len(STREAM_ORDER)
    return rank, _natural(stream)


def _meta(kind: str, pid: int, tid: int = 0, **args: Any) -> dict[str, Any]:
    return {"name": kind, "ph": "M", "pid": pid, "tid": tid, "args": args}


def _in_flight(result: SimResult, pid: int) -> list[dict[str, Any]]:
    """A counter of requests arrived and not yet finished, in a process of its own."""
    if not result.timings:
        return []
    steps: dict[float, int] = {}
    for t in result.timings:
        steps[t.arrival] = steps.get(t.arrival, 0) + 1
        steps[t.finish] = steps.get(t.finish, 0) - 1
    out = [_meta("process_name", pid, name="requests"),
           _meta("process_sort_index", pid, sort_index=0)]
    count = 0
    for when in sorted(steps):
        count += steps[when]
        out.append({"name": "requests in flight", "ph": "C", "ts": when * US, "pid": pid,
                    "tid": 0, "args": {"in flight": count}})
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def _summary(m: Metrics, title: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "title": title, "num_requests": m.num_requests, "makespan_s": _finite(m.makespan),
        "output_tokens": m.output_tokens, "throughput_tok_per_s": _finite(m.throughput),
        "request_rate_per_s": _finite(m.request_rate), "num_preemptions": m.num_preemptions}
    for name, stats in (("ttft", m.ttft), ("tpot", m.tpot), ("e2e", m.e2e)):
        for q in ("p50", "p99"):
            out[f"{name}_{q}_ms"] = _finite(stats.get(q, math.nan) * 1e3)
    out["utilization"] = {r: _finite(u) for r, u in m.utilization.items()}
    return out


# -- the timeline ----------------------------------------------------------------------

WIDTH, MARGIN = 1600, 12
LANE_H, BAR_H, GROUP_GAP, AXIS_H = 18, 14, 6, 26
MIN_BAR_W = 0.5  # a shorter event would not show at all
CHAR_W = 6.6  # monospace 11px advance width


@dataclass(frozen=True, slots=True)
class _Window:
    events: list[TraceEvent]  # the ones drawn, by start
    start: float
    end: float  # bars are cut here
    last: float  # the end of the whole trace
    num_events: int  # in the whole trace

    @property
    def truncated(self) -> bool:
        return len(self.events) < self.num_events


def _window(trace: list[TraceEvent], max_events: int) -> _Window:
    """The leading time window that holds the first `max_events` events to start."""
    ordered = sorted(trace, key=lambda e: (e.start, e.end))
    if not ordered:
        return _Window([], 0.0, 0.0, 0.0, 0)
    start, last = ordered[0].start, max(e.end for e in ordered)
    if len(ordered) <= max_events:
        return _Window(ordered, start, last, last, len(ordered))
    shown = ordered[:max_events]
    end = ordered[max_events].start
    if end <= start:  # they all start together: draw them whole
        end = max(e.end for e in shown)
    return _Window(shown, start, end, last, len(ordered))


def _key(e: TraceEvent) -> str:
    return legend_key(e.kind, e.name)


def legend_key(kind: str, name: str) -> str:
    """The legend entry of an event; shared and dense experts are told apart by their name
    ('Expert L3 shared'), as the simulator labels them."""
    if kind == "Expert" and name.rsplit(" ", 1)[-1] in ("shared", "dense"):
        return "Expert shared/dense"
    return kind


def _fills(keys: Iterable[str]) -> dict[str, str]:
    """Legend entry -> fill, for the entries used: render's kinds first, then others."""
    used = set(keys)
    fills = {k: f for k, f in KIND_FILLS.items() if k in used}
    for i, k in enumerate(sorted(used - fills.keys())):
        fills[k] = OTHER_FILLS[i % len(OTHER_FILLS)]
    return fills


def _seconds(s: float) -> str:
    """A duration in the unit that suits it: '850 µs', '12.3 ms', '6.9 s'."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def _ticks(start: float, end: float, num: int = 10) -> list[tuple[float, str]]:
    """About `num` round instants in [start, end], each with its label in one unit."""
    span = max(end - start, 1e-9)
    mag = 10 ** math.floor(math.log10(span / num))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= span / num)
    unit, scale = next((u, s) for u, s in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6))
                       if max(abs(end), span) >= s or u == "µs")
    decimals = max(0, -math.floor(math.log10(step / scale) + 1e-9))
    first = math.ceil(start / step - 1e-9)
    count = math.floor(end / step + 1e-9) - first + 1
    return [((first + i) * step, f"{(first + i) * step / scale:.{decimals}f} {unit}")
            for i in range(count)]


def _svg(resources: list[str], window: _Window, fills: dict[str, str]) -> str:
    gutter = max(110.0, max((len(r) for r in resources), default=0) * CHAR_W + 2 * MARGIN)
    x0, x1 = gutter, WIDTH - MARGIN
    scale = (x1 - x0) / max(window.end - window.start, 1e-12)
    top: dict[str, float] = {}
    bands: list[tuple[str, float, float]] = []  # actor, top, bottom
    y = float(AXIS_H)
    for r in resources:
        actor = _split(r)[0]
        if not bands or bands[-1][0] != actor:
            y += GROUP_GAP if bands else 0
            bands.append((actor, y, y))
        top[r] = y
        y += LANE_H
        bands[-1] = (actor, bands[-1][1], y)
    height = y + MARGIN
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}" '
           f'viewBox="0 0 {WIDTH} {height:.0f}" font-family="{_MONO}">']
    for i, (actor, band_top, band_bottom) in enumerate(bands):
        out.append(f'<rect class="band" x="0" y="{band_top - 2:.0f}" width="{WIDTH}" '
                   f'height="{band_bottom - band_top + 4:.0f}" fill="{_band_tint(i + 1)}"/>')
    if resources:
        for when, label in _ticks(window.start, window.end):
            x = x0 + (when - window.start) * scale
            out.append(f'<line class="tick" x1="{x:.1f}" y1="{AXIS_H - 6}" x2="{x:.1f}" '
                       f'y2="{y:.0f}" stroke="#c8ced6" stroke-width="0.6"/>'
                       f'<text x="{x:.1f}" y="{AXIS_H - 10}" font-size="10" fill="#555" '
                       f'text-anchor="middle">{_x(label)}</text>')
    for r in resources:
        actor, stream = _split(r)
        rest = f'<tspan fill="#777">/{_x(stream)}</tspan>' if stream else ""
        out.append(f'<text class="lane" x="{MARGIN}" y="{top[r] + 13:.0f}" font-size="11">'
                   f'<tspan font-weight="bold">{_x(actor)}</tspan>{rest}</text>')
    for e in window.events:
        x = x0 + (e.start - window.start) * scale
        w = max(MIN_BAR_W, (min(e.end, window.end) - e.start) * scale)
        # Only a bar wide enough to keep its colour inside gets an outline.
        edge = ' stroke="#555" stroke-width="0.5"' if w >= 4 else ""
        out.append(f'<rect class="ev" x="{x:.2f}" y="{top[e.resource] + 2:.0f}" '
                   f'width="{w:.2f}" height="{BAR_H}" fill="{fills[_key(e)]}"{edge}>'
                   f"<title>{_x(_tooltip(e))}</title></rect>")
    out.append("</svg>")
    return "\n".join(out)


def _tooltip(e: TraceEvent) -> str:
    layer = "-" if e.layer is None else e.layer
    return (f"{e.name}\n{e.resource} · {e.kind}\njob {e.job} · node {e.node} · layer {layer}\n"
            f"start {e.start * 1e3:.3f} ms · {_seconds(e.end - e.start)}")


def _header(result: SimResult, resources: list[str], window: _Window, fills: dict[str, str],
            heading: str) -> str:
    m = result.metrics
    if not window.num_events:
        span = "no events"
    elif window.truncated:
        span = (f"showing the first {_seconds(window.end - window.start)} of "
                f"{_seconds(window.last - window.start)} ({len(window.events):,} of "
                f"{window.num_events:,} events)")
    else:
        span = f"{window.num_events:,} events over {_seconds(window.last - window.start)}"
    meta = (f"{span} · {len(resources)} resources · from t = {window.start * 1e3:.3f} ms · "
            "hover a bar for its record")
    run = [("requests", f"{m.num_requests}"), ("makespan", _seconds(m.makespan)),
           ("throughput", f"{m.throughput:.1f} output tok/s"),
           ("request rate", f"{m.request_rate:.2f} req/s")]
    if m.num_preemptions:
        run.append(("preemptions", f"{m.num_preemptions}"))
    run_rows = "".join(f"<tr><th>{_x(k)}</th><td>{_x(v)}</td></tr>" for k, v in run)
    latency_rows = "".join(
        f"<tr><th>{name}</th>" + "".join(f'<td class="num">{_ms(stats, q)}</td>'
                                         for q in ("p50", "p99")) + "</tr>"
        for name, stats in (("TTFT", m.ttft), ("TPOT", m.tpot), ("end-to-end", m.e2e)))
    swatches = "".join(f'<span class="key"><span class="swatch" style="background:{fill}">'
                       f"</span>{_x(name)}</span>" for name, fill in fills.items())
    return (f"<header><h1>{_x(heading)}</h1>"
            f'<p class="meta{" cut" if window.truncated else ""}">{_x(meta)}</p>'
            f'<div class="facts"><table><caption>Run</caption>{run_rows}</table>'
            f"<table><caption>Latency (ms)</caption><tr><th></th><th>p50</th><th>p99</th>"
            f"</tr>{latency_rows}</table>{_utilization(m.utilization)}"
            f'<div class="legend"><div>{swatches}</div></div></div></header>')


def _ms(stats: dict[str, float], q: str) -> str:
    value = stats.get(q, math.nan) * 1e3
    return f"{value:.2f}" if math.isfinite(value) else "-"


def _utilization(utilization: dict[str, float]) -> str:
    """Busy share of the makespan, an actor per row and a stream per column."""
    resources = _resources(utilization)
    actors = list(dict.fromkeys(_split(r)[0] for r in resources))
    streams = sorted({_split(r)[1] for r in resources}, key=_stream_key)
    head = "".join(f"<th>{_x(s or '-')}</th>" for s in streams)
    rows = []
    for a in actors:
        cells = []
        for s in streams:
            u = utilization.get(f"{a}/{s}" if s else a)
            cells.append('<td class="num">-</td>' if u is None else
                         f'<td class="num" style="background:linear-gradient(to right, '
                         f'#c6dbef {u:.0%}, transparent {u:.0%})">{u:.0%}</td>')
        rows.append(f"<tr><th>{_x(a)}</th>{''.join(cells)}</tr>")
    return (f"<table><caption>Utilization</caption><tr><th></th>{head}</tr>"
            f"{''.join(rows)}</table>")


_TIMELINE_CSS = """
.facts { align-items: flex-start; }
th { font-weight: normal; color: #444; background: #f6f8fb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.meta.cut { color: #a04000; }
.ev:hover { stroke: #000; stroke-width: 1; }
"""
