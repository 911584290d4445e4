"""The simulator's shortcuts give what the plain computation gives: the top-k selection of a
routing draw, durations cached by what they depend on, trace times formatted once, and plans
replayed for units of another shape."""

from __future__ import annotations

import json
import random
from itertools import compress
from pathlib import Path

from moeflow.dataflow import Expert, SeqChunk, Unit
from moeflow.scheduler import BatchEP
from moeflow.sim import hardware, models
from moeflow.sim.cost import CostModel, RowCosts
from moeflow.sim.simulator import Simulator
from array import array

from moeflow.sim.tracefile import ChromeWriter
from moeflow.sim.tracelines import DURATIONS_KEPT, EVENTS, LANES, Lines, message, serve
from moeflow.sim.workload import Lengths, Routing, _winners, requests


def reference_winners(keys: list[float], live: list[int], k: int) -> list[int]:
    kth = sorted(keys)[-k]
    return list(compress(live, map(kth.__le__, keys)))


def test_winners_sorts_only_the_keys_above_the_cut_and_falls_back_when_too_few_are():
    rng = random.Random(3)
    for n, k in ((160, 6), (64, 2), (12, 4)):
        live = list(range(100, 100 + n))
        for cut in (None, 1 - (3 * k + 4) / n, 0.999, 0.0):
            for _ in range(200):
                keys = [rng.random() for _ in range(n)]
                if rng.random() < 0.2:  # a tie at the k-th key
                    top = sorted(keys)
                    keys[keys.index(top[-k - 1])] = top[-k]
                assert _winners(keys, live, k, cut) == reference_winners(keys, live, k)


def test_row_costs_are_the_cost_models():
    spec, h200 = models.load("deepseek-v2"), hardware.load("h200x8")
    cost = CostModel(spec, h200)
    cluster = Simulator(spec, h200, BatchEP(), Routing("uniform", 160, 6, 60)).cluster
    graph = BatchEP().plan(Unit((SeqChunk(0, 0, 3, "cuda:0"), SeqChunk(1, 5, 1, "cuda:1"))),
                           spec, cluster).graph
    costs = RowCosts(cost)
    rng = random.Random(0)
    for node in graph.nodes:
        experts = getattr(node, "experts", ())
        if not experts:
            continue
        for _ in range(3):
            rows = tuple(rng.choice((0, 0, 1, 7)) for _ in experts)
            if isinstance(node, Expert):
                assert costs.routed(graph, node, rows) == cost.duration(graph, node, rows)
            else:
                assert costs.moved(graph, node, sum(rows)) == cost.duration(graph, node, rows)
    assert costs.row_bytes == spec.hidden_size * cost.b


def test_trace_lines_format_each_time_once_and_keep_few():
    out: list[str] = []
    lines = Lines(out.append)
    lines.add_lanes([("<", "|", ">\n")])
    events = [(0.5, 0.5 + 1e-6), (0.5, 0.5 + 2e-6), (0.5, 0.5 + 1e-6), (0.75, 0.75 + 1e-6)]
    events += [(1.0, 1.0 + i * 1e-9) for i in range(DURATIONS_KEPT + 5)]
    lines.add(array("d", [x for start, end in events for x in (0, 7, start, end)]))
    assert len(lines.durs) <= DURATIONS_KEPT
    assert len(out) == 1  # one write for the batch
    got = [line.removeprefix("<").removesuffix(">\n").split("|")
           for line in out[0].splitlines(keepends=True)]
    assert all(job == "7" for _, job in got)
    assert [tuple(map(float, ts.split(',"dur":'))) for ts, _ in got] == [
        (round(s * 1e6, 3), round((e - s) * 1e6, 3)) for s, e in events]


def test_trace_lines_refuse_a_cut_or_unknown_message():
    import io

    whole = message(LANES, b'[["a","b","c"]]') + message(EVENTS, array("d", [0, 1, 0, 1]).tobytes())
    out: list[str] = []
    serve(io.BytesIO(whole), out.append)
    assert out == ["a0.000,\"dur\":1000000.000b1c"]
    for bad in (whole[:-3], whole[:4], message(b"X", b"")):
        try:
            serve(io.BytesIO(bad), [].append)
        except ValueError as exc:
            assert "ended inside" in str(exc) or "unknown" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was taken")


def test_chrome_writer_hands_lines_to_its_child_in_order(tmp_path: Path):
    writer = ChromeWriter(tmp_path / "t.json")
    a = writer.prepare("cuda:0/compute", "Gate L0", "Gate", 3, 0)
    b = writer.prepare("cuda:1/send", 'a "b"', "Transfer", 4, None)
    assert writer.prepare("cuda:0/compute", "Gate L0", "Gate", 3, 0) == a
    events = [((a, b)[i % 2], i, i * 1e-6, i * 1e-6 + (i % 3) * 1e-9) for i in range(5000)]
    for batch in (events[:1], events[1:4000], [], events[4000:]):
        writer.add([x for event in batch for x in event])
    writer.finish([], {"x": 1})
    doc = json.loads((tmp_path / "t.json").read_text())
    got = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["args"]["job"], e["ts"], e["dur"]) for e in got] == [
        (("Gate L0", 'a "b"')[i % 2], i, round(s * 1e6, 3), round((e - s) * 1e6, 3))
        for i, (_, _, s, e) in enumerate(events)]
    assert doc["metadata"] == {"x": 1}
    assert not (tmp_path / "t.json.part").exists()


class ByHomes(BatchEP):
    """batch-ep with plans shared by every unit with the same homes."""

    name = "by-homes"

    def plan_key(self, unit):
        return frozenset(s.home for s in unit.seqs)


def test_a_plan_replays_for_units_of_another_shape_on_the_same_homes():
    spec = models.load("olmoe-1b-7b")
    reqs = requests("poisson:rate=80", 8, Lengths.parse("uniform:8-40"),
                    Lengths.parse("uniform:2-8"), seed=5)

    def run(scheduler, **kw):
        routing = Routing.parse("uniform", spec.moe.num_experts, spec.moe.top_k,
                                spec.num_layers, seed=0)
        return Simulator(spec, hardware.load("h100x8"), scheduler, routing, **kw).run(reqs)

    shared, fresh = run(ByHomes()), run(BatchEP(), plan_cache=0)
    assert len({id(j.plan) for j in shared.jobs}) < len({j.unit for j in shared.jobs})
    assert shared.metrics == fresh.metrics and shared.timings == fresh.timings
    assert shared.trace == fresh.trace and shared.durations == fresh.durations


def test_chrome_writer_says_so_when_its_line_writer_dies(tmp_path: Path):
    writer = ChromeWriter(tmp_path / "t.json")
    lane = writer.prepare("cuda:0/compute", "Gate L0", "Gate", 3, 0)
    writer.lines.child.kill()
    writer.lines.child.wait()
    for call in (lambda: writer.add([lane, 0, 0.0, 1e-6]), lambda: writer.finish([], {})):
        try:
            call()
        except RuntimeError as exc:
            assert "line writer" in str(exc)
        else:
            raise AssertionError("a dead line writer went unnoticed")
    assert list(tmp_path.iterdir()) == []  # finishing failed: nothing left behind
    writer.abort()  # and aborting again is harmless
