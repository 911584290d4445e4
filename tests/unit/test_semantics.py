"""The execution semantics on hand-made plans."""

from __future__ import annotations

import pytest

from moeflow.dataflow import Cut, Placement, SeqChunk, Unit, compile
from moeflow.models.families import spec_from_config
from moeflow.models.tiny import tiny_config
from moeflow.scheduler import (
    ByPriority, Execution, InOrder, Plan, PlanError, SemanticsError, Stream, topological_plan,
)


def graph(homes=("cpu:0",), devices=("cpu:0", "cpu:1")):
    s = spec_from_config(tiny_config("qwen3_moe"))
    u = Unit(tuple(SeqChunk(i, 0, 3, h) for i, h in enumerate(homes)))
    return compile(s, u, Placement.sharded(devices, 8), Cut())


def drain(execution: Execution) -> list[tuple[int, int]]:
    order = []
    for task in execution.run_in_order():
        order.append(task)
        execution.finish(task)
    return order


def test_topological_plan_runs_every_node_once_after_its_preds():
    g = graph()
    order = drain(Execution([topological_plan(g)]))
    assert sorted(n for _, n in order) == list(range(len(g.nodes)))
    position = {n: i for i, (_, n) in enumerate(order)}
    for e in g.edges:
        assert position[e.src] < position[e.dst]


def test_in_order_stream_waits_for_its_head():
    g = graph()
    plan = topological_plan(g)
    ex = Execution([plan])
    stream = plan.assignment[len(g.nodes) - 1]  # the LMHead's stream
    head = ex.next_node(stream)
    assert head == (0, 0)  # the Embed, the only ready node on its stream
    ex.start(head)
    assert ex.next_node(stream) is None  # busy: one node at a time
    with pytest.raises(SemanticsError):
        ex.start((0, 1))


def test_priority_stream_picks_the_smallest_ready_key():
    g = graph()
    streams = tuple(Stream(n.src if hasattr(n, "src") else n.device) for n in g.nodes)
    keys = tuple((-float(i),) for i in range(len(g.nodes)))  # latest node first when ready
    plan = Plan(g, streams, tuple((s, ByPriority()) for s in sorted(set(streams))), keys)
    order = drain(Execution([plan]))
    assert len(order) == len(g.nodes)


def test_a_node_joins_a_group_only_if_it_passes_no_ready_node_that_ranks_before_it():
    g = graph()
    stream = Stream("cpu:0")
    streams = tuple(stream for _ in g.nodes)

    def plan(key: float, merge: str) -> Plan:
        return Plan(g, streams, ((stream, ByPriority(coalesce=True)),),
                    tuple((key,) for _ in g.nodes), tuple((merge,) for _ in g.nodes))

    # each plan's embedding is ready: a (key 0, "x") heads; c shares its merge key but
    # ranks after b, which is left out of the group: c must not pass b
    ex = Execution([plan(0.0, "x"), plan(1.0, "y"), plan(2.0, "x")])
    assert ex.next_group(stream) == ((0, 0),)
    # c ranking with b: it passes no one that ranks before it, so it joins
    ex = Execution([plan(0.0, "x"), plan(1.0, "y"), plan(1.0, "x")])
    assert ex.next_group(stream) == ((0, 0), (2, 0))
    # nothing left out: every mate joins, whatever its key
    ex = Execution([plan(0.0, "x"), plan(2.0, "x")])
    assert ex.next_group(stream) == ((0, 0), (1, 0))


def test_gate_counts_arrive_with_completion():
    g = graph()
    ex = Execution([topological_plan(g)])
    for task in ex.run_in_order():
        node = g.nodes[task[1]]
        ex.finish(task, (1, 0, 2, 0, 0, 0, 0, 1) if type(node).__name__ == "Gate" else None)
    assert ex.counts(0, 0) == (1, 0, 2, 0, 0, 0, 0, 1)


def test_a_stream_takes_another_rule_only_once_no_plan_held_uses_it():
    g = graph()
    in_order = topological_plan(g)
    streams = in_order.assignment
    by_priority = Plan(g, streams, tuple((s, ByPriority()) for s in sorted(set(streams))),
                       tuple((float(i),) for i in range(len(g.nodes))))
    ex = Execution([in_order])
    with pytest.raises(SemanticsError, match="follows InOrder in one plan"):
        ex.add(by_priority)  # the first plan still holds the streams
    drain(ex)
    ex.release(0)
    index = ex.add(by_priority)  # a server that changed policies, say
    assert [t[0] for t in drain(ex)] == [index] * len(g.nodes)
    ex.release(index)
    aborted = ex.add(in_order)
    ex.forget(aborted)  # an aborted unit lets go of its streams too
    ex.release(aborted)
    ex.add(by_priority)
    assert len(drain(ex)) == len(g.nodes)


def test_plan_validation():
    g = graph()
    good = topological_plan(g)
    with pytest.raises(PlanError, match="assignments"):
        Plan(g, good.assignment[:-1], good.rules)
    stream, rule = good.rules[0]
    with pytest.raises(PlanError, match="InOrder"):
        Plan(g, good.assignment, ((stream, InOrder(rule.order[:-1])), *good.rules[1:]))
    with pytest.raises(PlanError, match="no rule"):
        Plan(g, good.assignment, good.rules[1:])


def test_deadlock_is_reported_not_hung():
    g = graph()
    good = topological_plan(g)
    # reverse one stream's static order: its head is never ready
    rules = tuple((s, InOrder(tuple(reversed(r.order)))) if i == 0 else (s, r)
                  for i, (s, r) in enumerate(good.rules))
    with pytest.raises(SemanticsError, match="deadlock"):
        drain(Execution([Plan(g, good.assignment, rules)]))


def test_two_plans_share_streams():
    a, b = graph(("cpu:0",)), graph(("cpu:1",))
    ex = Execution([topological_plan(a), topological_plan(b)])
    order = drain(ex)
    assert {p for p, _ in order} == {0, 1} and ex.done


# -- on_routing -------------------------------------------------------------------------


def _routed(g, layer=None):
    return [n for n in g.nodes if type(n).__name__ == "Expert" and n.kind == "routed"
            and (layer is None or n.layer == layer)]


def test_on_routing_is_asked_once_per_layer_when_a_routed_expert_is_ready():
    g = graph(homes=("cpu:0", "cpu:1"))
    calls = []
    gates_done = set()

    def on_routing(index, layer, counts, groups):
        # every gate of the layer has finished: its routed experts read all of them
        assert {n.id for n in g.nodes if type(n).__name__ == "Gate" and n.layer == layer} \
            <= gates_done
        calls.append((index, layer, counts, groups))
        return {groups[0]: "dense"}

    ex = Execution([topological_plan(g)], on_routing=on_routing)
    for task in ex.run_in_order():
        node = g.nodes[task[1]]
        gate = type(node).__name__ == "Gate"
        if gate:
            gates_done.add(node.id)
        ex.finish(task, (1, 0, 2, 0, 0, 0, 0, 1) if gate else None)
    layers = sorted({n.layer for n in _routed(g)})
    assert [c[1] for c in calls] == layers  # once per layer, in order
    first, second = [n for n in _routed(g, layers[0])]
    assert calls[0][2] == (2, 0, 4, 0, 0, 0, 0, 2)  # both homes' gates, summed
    assert calls[0][3] == (first.experts, second.experts)
    assert ex.kernel((0, first.id)) == "dense"
    assert ex.kernel((0, second.id)) is None  # left to the executor
    assert ex.kernel((0, 0)) is None  # not a routed Expert
    assert ex.adjustments(0)[layers[0]] == {first.experts: "dense"}


def test_on_routing_failing_leaves_the_semantics_whole():
    g = graph()
    ex = Execution([topological_plan(g)],
                   on_routing=lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        for task in ex.run_in_order():
            ex.finish(task, (1,) * 8 if type(g.nodes[task[1]]).__name__ == "Gate" else None)
    # the node that readied a routed Expert is done and its successors are ready; a
    # caller that fails the unit forgets the plan
    ex.forget(0)
    ex.release(0)
    assert not ex.plans


def test_each_gates_counts_are_counted_once_however_many_dispatches_bring_them():
    from moeflow.dataflow.graph import Gate, Transfer

    g = compile(spec_from_config(tiny_config("qwen3_moe")),
                Unit((SeqChunk(0, 0, 3, "cpu:0"),)), Placement.sharded(("cpu:0", "cpu:1"), 8),
                Cut(expert_stages=2))
    plan = topological_plan(g)
    seen = []
    ex = Execution(on_routing=lambda i, layer, counts, groups: seen.append(counts))
    ex.add(plan, owns=lambda s: s.actor == "cpu:1")  # the owner of experts 4-7 only
    gate = next(n for n in g.nodes if isinstance(n, Gate) and n.layer == 0)
    dispatches = [n for n in g.nodes if isinstance(n, Transfer) and n.payload == "dispatch"
                  and n.layer == 0 and n.dst == "cpu:1"]
    assert len(dispatches) == 2  # one per stage, each with the gate's counts
    counts = (1, 1, 1, 1, 2, 0, 3, 0)
    pending = list(range(len(g.nodes)))
    while pending:  # finish what is ready: this actor's nodes, the others' externally
        progressed = False
        for node_id in list(pending):
            task = (0, node_id)
            if ex.owns(task):
                if ex.is_ready(task) and ex.next_node(plan.assignment[node_id]) == task:
                    ex.start(task)
                    ex.finish(task)
                    pending.remove(node_id)
                    progressed = True
            elif all(p not in pending for p in g.preds(node_id)):
                node = g.nodes[node_id]
                ex.finish_external(task, counts if node in dispatches else None)
                pending.remove(node_id)
                progressed = True
        assert progressed
    assert seen[0] == counts  # not doubled by the second dispatch
    assert ex.counts(0, gate.layer) == counts


def test_micro_batches_with_a_gate_each_are_asked_about_apart():
    from moeflow.dataflow.graph import Gate
    from moeflow.scheduler import Cluster
    from moeflow.scheduler.cgopipe import CGOPipe

    spec = spec_from_config(tiny_config("qwen3_moe"))
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    unit = Unit(tuple(SeqChunk(i, 0, 4, "cpu:0") for i in range(3)))
    plan = CGOPipe(micro_batches=3).plan(unit, spec, cluster)
    g = plan.graph
    seen = []
    ex = Execution([plan], on_routing=lambda i, layer, counts, groups: seen.append(
        (layer, counts)))
    num_gates = 0
    for task in ex.run_in_order():
        node = g.nodes[task[1]]
        if isinstance(node, Gate):  # each micro-batch's gate routes its own rows
            num_gates += 1
            ex.finish(task, tuple(num_gates if e == 0 else 0
                                  for e in range(spec.moe.num_experts)))
        else:
            ex.finish(task)
    layers = sorted({n.layer for n in _routed(g)})
    assert num_gates == 3 * len(layers)
    # once per micro-batch, each with its own gate's rows only
    assert [(layer, counts[0]) for layer, counts in seen] == [
        (layer, 3 * i + b + 1) for i, layer in enumerate(layers) for b in range(3)]
