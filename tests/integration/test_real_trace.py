"""Traces of real runs (moeflow.actors.tracing): every node an actor ran, on its stream's
lane, in the order it ran; between actor processes, transfers that run beside compute;
the switch through EngineConfig and the command line."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from moeflow.actors.cluster import JobSpec
from moeflow.actors.coordinator import ZmqExecutor
from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.actors.messages import RunUnit, UnitPart, decode, encode
from moeflow.actors.tracing import RealTrace, _Coverage, read_lanes, send_overlap
from moeflow.cli import main
from moeflow.dataflow import Cut, Placement, compile
from moeflow.dataflow.graph import SeqChunk, Unit
from moeflow.models.families import load_spec, spec_from_config
from moeflow.models.tiny import tiny_config
from moeflow.scheduler import EPS, BatchEP, Cluster, InOrder, topological_plan
from moeflow.serve.config import EngineConfig
from moeflow.testing.conformance import record_generation

DEVICES = ("cpu:0", "cpu:1")
PROMPTS = [[5, 17, 33, 2, 99, 250, 7, 8, 9, 10, 11, 300, 301], [8, 9, 10], [77, 78]]
TOLERANCE_US = 0.002  # times are written to the nanosecond
JOB = 10 ** 9  # a plan run alone, apart from the engine's jobs


def events(path):
    data = json.loads(path.read_text())
    return [e for e in data["traceEvents"] if e["ph"] == "X"], data["metadata"]


def lane_names(path):
    data = json.loads(path.read_text())
    actors = {e["pid"]: e["args"]["name"] for e in data["traceEvents"]
              if e["ph"] == "M" and e["name"] == "process_name"}
    return {(e["pid"], e["tid"]): f"{actors[e['pid']]}/{e['args']['name']}"
            for e in data["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}


def test_the_trace_fields_travel_on_the_wire():
    run = RunUnit(7, None, {0: [1, 2]}, {}, plan_id=3, trace=True)
    assert decode(encode(run)) == run
    part = UnitPart(7, "cpu:1", {0: 5}, spans=((3, 1.5, 2.25), (4, 2.25, 2.5)),
                    arrivals=((9, 1.75),))
    assert decode(encode(part)) == part
    assert decode(encode(UnitPart(7, "cpu:1", {0: 5}))).spans == ()


def test_a_trace_is_json_and_refuses_other_formats(tmp_path):
    with pytest.raises(ValueError, match=r"\.json"):
        RealTrace(tmp_path / "run.html")
    with pytest.raises(ValueError, match=r"\.json"):
        EngineConfig("some/model", trace=str(tmp_path / "run.html"))
    empty = RealTrace(tmp_path / "empty.json", "nothing ran")
    empty.close()
    data = json.loads((tmp_path / "empty.json").read_text())
    assert data["metadata"]["num_jobs"] == 0 and data["metadata"]["title"] == "nothing ran"
    assert not (tmp_path / "empty.json.part").exists()


def test_in_process_trace_holds_every_node_run_in_its_order(tiny_factory, tmp_path):
    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(DEVICES, spec.moe.num_experts)
    ran: dict[str, list[int]] = defaultdict(list)  # lane -> node ids, as they ran

    def observe(plan, node_id, stream):
        ran[f"{stream.actor}/{stream.name}"].append(node_id)

    trace = tmp_path / "inproc.json"
    executor = InProcessExecutor(load_workers(path, spec, cluster.placement, torch.float32,
                                              4096), observer=observe, want_logits=True,
                                 trace=trace)
    record_generation(executor, spec, EPS(stages=2), cluster, PROMPTS, 3)
    assert not trace.exists()  # complete once the executor closes
    executor.close()
    spans, meta = events(trace)
    names = lane_names(trace)
    assert meta["source"] == "real run" and meta["num_nodes"] == len(spans)
    assert meta["num_jobs"] == 3  # a prefill step, then two decode steps
    traced: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for e in spans:
        assert e["dur"] >= 0
        traced[names[(e["pid"], e["tid"])]].append((e["ts"], e["args"]["node"]))
    assert set(traced) == set(ran) == {f"{d}/{s}" for d in DEVICES for s in ("compute", "send")}
    for lane, nodes in ran.items():
        assert [n for _, n in sorted(traced[lane], key=lambda t: t[0])] == nodes, lane
    # one thread ran everything: no two spans overlap, whatever their lanes
    ordered = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans)
    for (_, end), (start, _) in zip(ordered, ordered[1:]):
        assert start >= end - TOLERANCE_US


@pytest.mark.timeout(300)
def test_actor_processes_trace_sends_running_beside_compute(tiny_factory, tmp_path):
    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(DEVICES, spec.moe.num_experts)
    trace = tmp_path / "actors.json"
    prompts = [[3 + (7 * i + j) % 400 for j in range(160)] for i in range(4)]  # prefill-heavy
    unit = Unit((SeqChunk(1000, 0, 100, "cpu:0"), SeqChunk(1001, 0, 100, "cpu:1")))
    plan = EPS(stages=2).plan(unit, spec, cluster)
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096, want_logits=True,
                     trace=trace) as executor:
        [alone] = executor.run_many([JobSpec(JOB, plan, {0: list(range(3, 103)),
                                                          1: list(range(5, 105))})])
        assert alone.error is None
        for chunk in unit.seqs:
            executor.release(chunk.home, chunk.seq_id)
        record_generation(executor, spec, EPS(stages=2), cluster, prompts, 2)
        executor.coordinator.close_trace()  # complete now; the rest runs untraced
        reference = record_generation(executor, spec, BatchEP(), cluster, prompts, 2)
    spans, meta = events(trace)
    assert meta["num_jobs"] >= 3 and meta["num_nodes"] == len(spans)
    # each stream of a static plan ran its nodes in the plan's order, as the simulator does
    names = lane_names(trace)
    ran: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for e in spans:
        if e["args"]["job"] == JOB:
            ran[names[(e["pid"], e["tid"])]].append((e["ts"], e["args"]["node"]))
    rules = {f"{stream.actor}/{stream.name}": rule for stream, rule in plan.rules}
    assert set(ran) == set(rules)
    for lane, rule in rules.items():
        assert isinstance(rule, InOrder)
        assert [n for _, n in sorted(ran[lane])] == list(rule.order), lane
    lanes = read_lanes(trace)
    assert set(lanes) == {f"{d}/{s}" for d in DEVICES for s in ("compute", "send")}
    for device in DEVICES:  # one core thread per actor runs its compute
        compute = lanes[f"{device}/compute"]
        for (_, end), (start, _) in zip(compute, compute[1:]):
            assert start >= end - TOLERANCE_US
    # a transfer runs until its receiver takes it in, while its sender computes on
    overlap = send_overlap(trace)
    assert sum(a["overlap_s"] for a in overlap.values()) > 0, overlap
    for actor in overlap.values():
        assert 0 <= actor["overlap_s"] <= min(actor["send_s"], actor["compute_s"]) + 1e-9
    assert reference[0]  # the executor ran on after its trace was closed


def test_generate_writes_a_trace_from_the_command_line(tiny_factory, tmp_path, capsys):
    path = tiny_factory("qwen3_moe")
    trace = tmp_path / "cli.json"
    assert main(["generate", str(path), "--prompt-ids", "5,6,7", "--max-new-tokens", "3",
                 "--devices", "cpu:0,cpu:1", "--trace", str(trace)]) == 0
    spans, meta = events(trace)
    assert meta["num_jobs"] == 3 and len(spans) == meta["num_nodes"] > 0
    assert {e["cat"] for e in spans} >= {"Attention", "Gate", "Expert", "Transfer", "LMHead"}


def test_a_lane_is_busy_for_the_union_of_its_spans():
    lane = _Coverage()
    for start, end in [(1.0, 2.0), (1.0, 2.0), (1.5, 3.0), (0.5, 0.75), (7.0, 8.0), (2.5, 4.0)]:
        lane.add(start, end)  # a group's shared span, overlaps, out of order
    assert lane.total() == pytest.approx(0.25 + 3.0 + 1.0)
    lane.fold(5.0)  # what ended before every open job began: no span can reach it again
    assert lane.spans == [[7.0, 8.0]]
    lane.add(7.5, 9.0)
    assert lane.total() == pytest.approx(3.25 + 2.0)


def test_a_trace_that_cannot_be_written_stops_and_fails_nothing(tmp_path, caplog):
    trace = RealTrace(tmp_path / "t.json")
    spec = spec_from_config(tiny_config("qwen3_moe"))
    unit = Unit((SeqChunk(0, 0, 3, "cpu:0"),))
    plan = topological_plan(compile(spec, unit, Placement.sharded(("cpu:0",), 8), Cut()))
    trace.begin(1, plan)
    trace.part(UnitPart(1, "cpu:0", {}, spans=((0, 1.0, 2.0), (1, 2.0, 3.0), (10 ** 6, 1.0, 2.0),
                                               (2, float("nan"), 1.0))))
    trace.end(1)  # two nodes written, two that are not spans of the plan
    trace.begin(2, plan)
    trace.part(UnitPart(2, "cpu:0", {}, spans=((0, 3.0, 4.0),)))
    trace.writer.lines.child.kill()  # the disk went away, say, and the writer with it
    trace.writer.lines.child.wait()
    trace.end(2)
    assert trace.closed and "cannot be written" in caplog.text
    trace.close()
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "t.json.part").exists()
    kept = RealTrace(tmp_path / "k.json", max_nodes=1)
    kept.begin(1, plan)
    kept.part(UnitPart(1, "cpu:0", {}, spans=((0, 1.0, 2.0), (1, 2.0, 3.0), (-1, 1.0, 2.0))))
    kept.end(1)
    kept.close()
    meta = json.loads((tmp_path / "k.json").read_text())["metadata"]
    assert (meta["num_nodes"], meta["nodes_not_written"], meta["bad_spans"]) == (1, 1, 1)
