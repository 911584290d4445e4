"""A node reads its inputs by role, not by the order the compiler added its edges: plans
whose graphs list every edge in reverse give the same logits and tokens, and a graph whose
nodes do not fill their kinds' roles is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.dataflow import Cut, Placement, SeqChunk, Unit, compile
from moeflow.dataflow.check import problems
from moeflow.dataflow.graph import Combine, Edge, Gate, Graph, GraphError, input_roles
from moeflow.models.families import load_spec, spec_from_config
from moeflow.models.tiny import tiny_config
from moeflow.scheduler import BatchEP, Cluster
from moeflow.scheduler.cgopipe import CGOPipe
from moeflow.scheduler.plan import Plan
from moeflow.testing.conformance import assert_same_generation, record_generation

PROMPTS = [[5, 17, 33, 2, 99, 250, 7], [8, 9, 10], [300, 301, 302, 40, 41]]


def _reversed(plan: Plan) -> Plan:
    g = plan.graph
    graph = Graph(g.unit, g.placement, g.nodes, tuple(reversed(g.edges)), g.num_layers)
    return dataclasses.replace(plan, graph=graph)


class BatchEPReversed(BatchEP):
    name = "batch-ep-reversed"

    def plan(self, unit, model, cluster):
        return _reversed(super().plan(unit, model, cluster))


class CGOPipeReversed(CGOPipe):
    name = "cgopipe-reversed"

    def plan(self, unit, model, cluster):
        return _reversed(super().plan(unit, model, cluster))


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_edges_in_any_order_give_the_same_generation(family, tiny_factory):
    """Combine (residual, gate, partials, shared expert), routed experts (rows from every
    home), and CGOPipe's attention cut in three (post reads the core and the pre part)."""
    path = tiny_factory(family)
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)

    def generate(scheduler):
        executor = InProcessExecutor(load_workers(path, spec, cluster.placement, torch.float32,
                                                  4096), want_logits=True)
        return record_generation(executor, spec, scheduler, cluster, PROMPTS, 4)

    reference = generate(BatchEP())
    assert_same_generation(generate(BatchEPReversed()), reference, 1e-4)
    if family == "qwen2_moe":  # MLA attention is not cut into parts
        assert_same_generation(generate(CGOPipeReversed()), reference, 1e-4)


def _graph():
    spec = spec_from_config(tiny_config("qwen3_moe"))
    unit = Unit((SeqChunk(0, 0, 3, "cpu:0"), SeqChunk(1, 0, 2, "cpu:1")))
    return spec, compile(spec, unit, Placement.sharded(("cpu:0", "cpu:1"), 8), Cut())


def test_a_compiled_graph_fills_every_role():
    spec, graph = _graph()
    assert problems(graph, spec) == []
    combine = next(n for n in graph.nodes if isinstance(n, Combine))
    roles = graph.roles(combine.id)
    assert set(roles) == {"attn", "routing", "partials"}
    assert len(roles["attn"]) == len(roles["routing"]) == 1
    assert len(roles["partials"]) == 2  # its own experts' output, the other owner's combine
    assert set(input_roles(combine)) >= set(roles)


def test_a_node_that_does_not_fill_its_roles_is_refused():
    spec, graph = _graph()
    combine = next(n for n in graph.nodes if isinstance(n, Combine))
    residual = graph.roles(combine.id)["attn"][0]
    other_gate = next(n for n in graph.nodes if isinstance(n, Gate)
                      and n.layer == combine.layer and n.device != combine.device)
    edges = tuple(e for e in graph.edges if (e.src, e.dst) != (residual, combine.id)) + (
        Edge(other_gate.id, combine.id),)
    broken = Graph(graph.unit, graph.placement, graph.nodes, edges, graph.num_layers)
    found = "; ".join(problems(broken, spec))
    assert f"Combine#{combine.id}" in found
    assert "reads 0 attn input(s), takes 1" in found
    assert "reads 2 routing input(s), takes 0 to 1" in found
    lm_head = len(graph.nodes) - 1
    wrong = Graph(graph.unit, graph.placement, graph.nodes,
                  graph.edges + (Edge(other_gate.id, lm_head),), graph.num_layers)
    assert "an input it has no role for" in "; ".join(problems(wrong, spec))
    with pytest.raises(GraphError, match="no input role"):
        wrong.roles(lm_head)


def test_an_actor_fails_a_unit_whose_plan_has_a_node_without_its_roles():
    from moeflow.actors.core import COORDINATOR, ActorCore
    from moeflow.actors.messages import NodeFailed, RunUnit
    from moeflow.actors.null import NullWorker
    from moeflow.scheduler import topological_plan

    spec, graph = _graph()
    lm_head = graph.nodes[-1]
    gate = next(n for n in graph.nodes if isinstance(n, Gate) and n.device == lm_head.device)
    wrong = Graph(graph.unit, graph.placement, graph.nodes,
                  graph.edges + (Edge(gate.id, lm_head.id),), graph.num_layers)
    core = ActorCore(lm_head.device, NullWorker(lm_head.device, spec))
    [out] = core.handle(RunUnit(7, topological_plan(wrong), {0: [1, 2, 3], 1: [4, 5]}, {}))
    assert out.to == COORDINATOR and isinstance(out.msg, NodeFailed)
    assert out.msg.unit_id == 7 and "no input role" in out.msg.error
    assert not core.units and not core.execution.plans
