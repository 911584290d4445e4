"""`moeflow.sim.trace`: Chrome traces and HTML timelines of simulated runs, checked by
parsing what they write against the trace they were drawn from."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from moeflow.dataflow.render import KIND_FILLS
from moeflow.scheduler import BatchEP
from moeflow.sim import hardware, models, trace
from moeflow.sim.simulator import (
    Metrics, RequestTiming, SimResult, Simulator, TraceEvent, busy_of,
)
from moeflow.sim.tracefile import ChromeWriter, TimelineWriter, open_trace
from moeflow.sim.workload import Lengths, Routing, requests

SVG = "{http://www.w3.org/2000/svg}"


def simulated(**run: Any) -> SimResult:
    spec = models.load("olmoe-1b-7b")
    routing = Routing.parse("uniform", spec.moe.num_experts, spec.moe.top_k, spec.num_layers,
                            seed=0)
    sim = Simulator(spec, hardware.load("h100x8"), BatchEP(), routing)
    return sim.run(requests("poisson:rate=50", 6, Lengths.parse("uniform:16-32"),
                            Lengths.parse("uniform:2-4"), seed=0), **run)


def hand_built(resources: list[str], kinds: tuple[str, ...] = ("Attention",),
               output: int = 3) -> SimResult:
    """Three back-to-back events on every resource, and two requests over them."""
    events = [TraceEvent(r, f"{kinds[i % len(kinds)]} L{i}", kinds[i % len(kinds)], 0,
                         10 * n + i, i, 1e-3 * (i + n), 1e-3 * (i + n + 1))
              for n, r in enumerate(resources) for i in range(3)]
    end = max(e.end for e in events)
    timings = [RequestTiming(0, 0.0, 1e-3, end, 8, output),
               RequestTiming(1, 2e-3, 4e-3, end / 2, 8, output)]
    metrics = Metrics.of(timings, busy_of(events), {}, {}, 0)
    return SimResult(events, timings, metrics, [])


SIM = simulated()
# Twelve devices listed out of order, so that only a natural sort puts them right.
TWELVE = [f"cuda:{i}/{s}" for i in (10, 2, 11, 0, 1, 3, 4, 5, 6, 7, 8, 9)
          for s in ("send", "compute")] + ["cuda:3/aux10", "cuda:3/recv", "cuda:3/aux2"]
NATURAL = ([f"cuda:{i}/{s}" for i in range(3) for s in ("compute", "send")]
           + ["cuda:3/compute", "cuda:3/send", "cuda:3/recv", "cuda:3/aux2", "cuda:3/aux10"]
           + [f"cuda:{i}/{s}" for i in range(4, 12) for s in ("compute", "send")])


def lanes(doc: dict[str, Any]) -> dict[tuple[int, int], str]:
    """(pid, tid) -> "process/thread", from the metadata events."""
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    return {(e["pid"], e["tid"]): f"{process[e['pid']]}/{e['args']['name']}"
            for e in meta if e["name"] == "thread_name"}


def svg_root(page: str) -> ET.Element:
    match = re.search(r"<svg .*?</svg>", page, re.S)
    assert match is not None
    return ET.fromstring(match.group(0))


def lane_labels(root: ET.Element) -> list[tuple[str, float]]:
    return [("".join(t.itertext()), float(t.get("y", "nan")))
            for t in root.iter(f"{SVG}text") if t.get("class") == "lane"]


def seconds(text: str) -> float:
    value, unit = text.split(" ")
    return float(value) * {"s": 1.0, "ms": 1e-3, "µs": 1e-6}[unit]


def bars(root: ET.Element) -> list[ET.Element]:
    return [r for r in root.iter(f"{SVG}rect") if r.get("class") == "ev"]


# -- Chrome ----------------------------------------------------------------------------


def test_chrome_trace_round_trips_through_json() -> None:
    doc = trace.to_chrome(SIM, title="olmoe")
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["displayTimeUnit"] == "ms"


def test_chrome_has_a_complete_event_per_trace_event_with_times_in_microseconds() -> None:
    doc = trace.to_chrome(SIM)
    complete = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == len(SIM.trace)
    named = lanes(doc)
    for e, ev in zip(complete, SIM.trace):
        assert {"ts", "dur", "pid", "tid", "name", "cat", "args"} <= e.keys()
        # to the nanosecond
        assert e["ts"] == round(ev.start * 1e6, 3)
        assert e["dur"] == round((ev.end - ev.start) * 1e6, 3)
        assert (e["name"], e["cat"]) == (ev.name, ev.kind)
        assert e["args"] == {"job": ev.job, "node": ev.node, "layer": ev.layer}
        assert named[e["pid"], e["tid"]] == ev.resource


def test_chrome_has_exactly_one_named_lane_per_resource() -> None:
    doc = trace.to_chrome(SIM)
    used = {(e["pid"], e["tid"]) for e in doc["traceEvents"] if e["ph"] == "X"}
    named = lanes(doc)
    assert used == set(named)
    assert sorted(named.values()) == sorted({e.resource for e in SIM.trace})


def test_chrome_sorts_devices_naturally_and_compute_before_send() -> None:
    doc = trace.to_chrome(hand_built(TWELVE))
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    order = {e["pid"]: e["args"]["sort_index"] for e in meta
             if e["name"] == "process_sort_index"}
    devices = [process[p] for p in sorted(order, key=order.__getitem__)
               if process[p] != "requests"]
    assert devices == [f"cuda:{i}" for i in range(12)]
    assert sorted(p for p in process if process[p] != "requests") == list(range(1, 13))
    thread_order = {(e["pid"], e["tid"]): e["args"]["sort_index"] for e in meta
                    if e["name"] == "thread_sort_index"}
    named = lanes(doc)
    assert sorted(named, key=lambda lane: (order[lane[0]], thread_order[lane])) == sorted(named)
    assert [named[lane] for lane in sorted(named)] == NATURAL


def test_chrome_metadata_holds_title_and_metrics_without_nan() -> None:
    result = hand_built(["cuda:0/compute"], output=1)  # a single output token: no TPOT
    meta = trace.to_chrome(result, title="run <1>")["metadata"]
    m = result.metrics
    assert meta["title"] == "run <1>" and meta["num_requests"] == 2
    assert meta["makespan_s"] == m.makespan and meta["throughput_tok_per_s"] == m.throughput
    assert meta["ttft_p50_ms"] == m.ttft["p50"] * 1e3 and meta["e2e_p99_ms"] == m.e2e["p99"] * 1e3
    assert meta["tpot_p50_ms"] is None and meta["tpot_p99_ms"] is None
    assert meta["utilization"] == m.utilization
    json.dumps(meta, allow_nan=False)


def test_chrome_counts_requests_in_flight() -> None:
    doc = trace.to_chrome(SIM)
    counts = [e for e in doc["traceEvents"] if e["ph"] == "C"]
    values = [e["args"]["in flight"] for e in counts]
    assert [e["ts"] for e in counts] == sorted(e["ts"] for e in counts)
    assert min(values) >= 0 and max(values) <= len(SIM.timings) and values[-1] == 0
    assert counts[0]["ts"] == min(t.arrival for t in SIM.timings) * 1e6


def test_empty_trace_renders_both_formats() -> None:
    empty = SimResult([], [], Metrics.of([], {}, {}, {}, 0), [])
    assert [e for e in trace.to_chrome(empty)["traceEvents"] if e["ph"] == "X"] == []
    page = trace.to_html(empty)
    assert bars(svg_root(page)) == [] and "no events" in page


# -- HTML ------------------------------------------------------------------------------


def test_html_draws_a_lane_per_resource_and_a_bar_per_event_in_its_lane() -> None:
    page = trace.to_html(SIM, title="olmoe")
    root = svg_root(page)
    labels = lane_labels(root)
    assert sorted(name for name, _ in labels) == sorted({e.resource for e in SIM.trace})
    drawn = bars(root)
    assert len(drawn) == len(SIM.trace)
    tips = sorted((r.findtext(f"{SVG}title") or "").split("\n")[0] for r in drawn)
    assert tips == sorted(e.name for e in SIM.trace)
    width = float(root.get("width", "0"))
    for rect in drawn:
        tip = (rect.findtext(f"{SVG}title") or "").split("\n")
        resource, kind = tip[1].split(" · ")
        centre = float(rect.get("y", "nan")) + float(rect.get("height", "nan")) / 2
        nearest = min(labels, key=lambda label: abs(label[1] - centre))[0]
        assert nearest == resource
        assert rect.get("fill") == KIND_FILLS[kind]
        x, w = float(rect.get("x", "nan")), float(rect.get("width", "nan"))
        assert 0 < x and x + w <= width
    assert "events over" in page and "showing the first" not in page


def test_html_lanes_come_in_natural_order() -> None:
    labels = lane_labels(svg_root(trace.to_html(hand_built(TWELVE))))
    assert [name for name, _ in labels] == NATURAL
    assert [y for _, y in labels] == sorted(y for _, y in labels)


def test_html_colours_shared_experts_and_unknown_kinds_and_lists_them_in_the_legend() -> None:
    result = hand_built(["cpu:0/compute"], kinds=("Expert", "Mystery"))
    shared = TraceEvent("cpu:0/compute", "Expert L0 shared", "Expert", 0, 99, 0, 0.0, 1e-3)
    result.trace.append(shared)
    page = trace.to_html(result)
    fills = {(r.findtext(f"{SVG}title") or "").split("\n")[0]: r.get("fill")
             for r in bars(svg_root(page))}
    assert fills["Expert L0"] == KIND_FILLS["Expert"]
    assert fills["Expert L0 shared"] == KIND_FILLS["Expert shared/dense"]
    assert fills["Mystery L1"] not in KIND_FILLS.values()
    legend = page[page.index('class="legend"'):page.index("<svg")]
    assert ["Expert", "Expert shared/dense", "Mystery"] == re.findall(r"</span>([^<]+)</span>",
                                                                       legend)


def test_html_truncates_to_a_leading_window_and_says_so() -> None:
    page = trace.to_html(SIM, max_events=50)
    root = svg_root(page)
    drawn = bars(root)
    assert len(drawn) == 50
    ordered = sorted(SIM.trace, key=lambda e: (e.start, e.end))
    names = sorted((r.findtext(f"{SVG}title") or "").split("\n")[0] for r in drawn)
    assert names == sorted(e.name for e in ordered[:50])
    note = re.search(r"showing the first ([\d.]+ \S+) of ([\d.]+ \S+) "
                     rf"\(50 of {len(SIM.trace):,} events\)", page)
    assert note is not None
    shown, total = (seconds(note.group(i)) for i in (1, 2))
    assert shown == pytest.approx(ordered[50].start - ordered[0].start, rel=0.01)
    assert total == pytest.approx(max(e.end for e in SIM.trace) - ordered[0].start, rel=0.01)
    width = float(root.get("width", "0"))
    assert all(float(r.get("x", "nan")) + float(r.get("width", "nan")) <= width for r in drawn)
    assert len(lane_labels(root)) == len({e.resource for e in SIM.trace})
    with pytest.raises(ValueError, match="max_events"):
        trace.to_html(SIM, max_events=0)


def test_html_tick_labels_increase_in_one_unit() -> None:
    root = svg_root(trace.to_html(SIM))
    ticks = [t.text or "" for t in root.iter(f"{SVG}text") if t.get("class") != "lane"]
    assert 4 <= len(ticks) <= 25
    values, units = zip(*(t.split(" ") for t in ticks))
    assert len(set(units)) == 1 and units[0] in ("µs", "ms", "s")
    assert list(map(float, values)) == sorted(map(float, values))


def test_html_escapes_resources_names_and_title() -> None:
    result = hand_built(["<&>/compute", "cuda:0/\"send\""])
    result.trace.append(TraceEvent("<&>/compute", "a<b & c>d", "Gate", 0, 1, None, 0.0, 1e-3))
    page = trace.to_html(result, title="<script>&amp;")
    assert "<script>" not in page and "a<b" not in page and "<&>" not in page
    root = svg_root(page)
    assert sorted(name for name, _ in lane_labels(root)) == sorted(['<&>/compute',
                                                                     'cuda:0/"send"'])
    tips = [(r.findtext(f"{SVG}title") or "") for r in bars(root)]
    assert any(t.startswith("a<b & c>d\n<&>/compute · Gate") for t in tips)
    assert "&lt;script&gt;&amp;amp;" in page


# -- files -----------------------------------------------------------------------------


def test_write_picks_the_format_by_suffix(tmp_path: Path) -> None:
    result = hand_built(["cuda:0/compute", "cuda:1/compute"])
    trace.write(result, tmp_path / "a" / "run.json", title="t")
    doc = json.loads((tmp_path / "a" / "run.json").read_text())
    assert doc == trace.to_chrome(result, title="t")
    for name in ("run.html", "run.HTM"):
        trace.write(result, tmp_path / "b" / name, title="t")
        assert (tmp_path / "b" / name).read_text() == trace.to_html(result, title="t")
    with pytest.raises(ValueError, match=r"\.json, \.html, \.htm"):
        trace.write(result, tmp_path / "run.png")
    assert not (tmp_path / "run.png").exists()


def test_write_helpers_make_folders(tmp_path: Path) -> None:
    result = hand_built(["cuda:0/compute"])
    trace.write_chrome(result, tmp_path / "x" / "y" / "t.trace")
    trace.write_timeline(result, tmp_path / "z" / "t.svg.html", max_events=2)
    assert json.loads((tmp_path / "x" / "y" / "t.trace").read_text())["traceEvents"]
    assert "(2 of 3 events)" in (tmp_path / "z" / "t.svg.html").read_text()


def test_trace_imports_nothing_impure() -> None:
    code = ("import sys, moeflow.sim.trace\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('asyncio', 'zmq', 'torch', 'numpy', 'triton'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""



# -- written as the run goes -----------------------------------------------------------


def streamed(path: Path, **sink: Any) -> SimResult:
    writer = open_trace(path, "olmoe")
    for name, value in sink.items():
        setattr(writer, name, value)
    result = simulated(record=False, sink=writer)
    writer.close(result)
    return result


def by_name(doc: dict[str, Any]) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Events with their lanes by name (a streamed trace numbers lanes as they come), the
    counter, and each lane's sort index."""
    named = lanes(doc)
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    order = {process[e["pid"]]: e["args"]["sort_index"] for e in meta
             if e["name"] == "process_sort_index"}
    order.update({named[e["pid"], e["tid"]]: e["args"]["sort_index"] for e in meta
                  if e["name"] == "thread_sort_index"})
    events = [(e["name"], e["cat"], e["ts"], e["dur"], named[e["pid"], e["tid"]], e["args"])
              for e in doc["traceEvents"] if e["ph"] == "X"]
    return events, [(e["ts"], e["args"]) for e in doc["traceEvents"] if e["ph"] == "C"], order


def test_a_streamed_chrome_trace_is_the_recorded_one(tmp_path: Path) -> None:
    result = streamed(tmp_path / "run.json")
    assert result.trace == [] and result.num_events == len(SIM.trace)
    assert result.metrics == SIM.metrics
    got = json.loads((tmp_path / "run.json").read_text())
    want = trace.to_chrome(SIM, title="olmoe")
    assert by_name(got) == by_name(want)
    assert got["metadata"] == want["metadata"] and got["displayTimeUnit"] == "ms"
    assert not (tmp_path / "run.json.part").exists()


def test_a_streamed_chrome_trace_is_complete_only_once_closed(tmp_path: Path) -> None:
    writer = ChromeWriter(tmp_path / "run.json")
    writer.add([writer.prepare("cuda:0/compute", 'a "b"', "Gate", 3, None), 0, 0.0, 1e-6])
    assert not (tmp_path / "run.json").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_streamed_timeline_is_the_recorded_one_and_windowed_alike(tmp_path: Path) -> None:
    for max_events in (50, 20000):
        streamed(tmp_path / "run.html", max_events=max_events)
        page = (tmp_path / "run.html").read_text()
        assert page == trace.to_html(SIM, title="olmoe", max_events=max_events)
    writer = TimelineWriter(tmp_path / "small.html", max_events=50)
    streamed_result = simulated(record=False, sink=writer)
    assert len(writer.kept) < 60  # what it holds is bounded by the window
    writer.close(streamed_result)


def test_open_trace_picks_the_writer_by_suffix(tmp_path: Path) -> None:
    assert isinstance(open_trace(tmp_path / "a.json"), ChromeWriter)
    assert isinstance(open_trace(tmp_path / "a.HTM"), TimelineWriter)
    with pytest.raises(ValueError, match=r"\.json, \.html, \.htm"):
        open_trace(tmp_path / "a.png")
    with pytest.raises(ValueError, match="max_events"):
        TimelineWriter(tmp_path / "a.html", max_events=0)
