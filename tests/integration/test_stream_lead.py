"""An actor that runs all its streams on one thread orders the nodes that start at once (a
fine-ep transfer and a compute node, say) by its plan's `lead` streams, and by nothing else:
the order between streams is the plan's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.actors.messages import plan_from_wire, plan_to_wire
from moeflow.models.families import load_spec
from moeflow.scheduler import Cluster, FineEP
from moeflow.scheduler.plan import LEAD, PlanError
from moeflow.testing.conformance import assert_same_generation, record_generation

PROMPTS = [[5, 17, 33, 2, 99], [8, 9, 10], [300, 301, 302, 40]]


class ComputeFirst(FineEP):
    name = "fine-ep-compute-first"

    def plan(self, unit, model, cluster):
        return dataclasses.replace(super().plan(unit, model, cluster), lead=("compute",))


def _run(path, scheduler):
    """Greedy generation, and per actor step that started several groups, their streams in
    the order the actor runs them."""
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    executor = InProcessExecutor(load_workers(path, spec, cluster.placement, torch.float32,
                                              4096), want_logits=True)
    batches: list[list[str]] = []
    for actor in executor.actors.values():
        def start_tasks(actor=actor, inner=actor.start_tasks):
            groups = inner()
            if len(groups) > 1:
                batches.append([actor.execution.stream_of(g[0]).name for g in groups])
            return groups
        actor.start_tasks = start_tasks
    return record_generation(executor, spec, scheduler, cluster, PROMPTS, 4), batches


def _ordered(batch, first):
    ranks = [0 if name in first else 1 for name in batch]
    return ranks == sorted(ranks)


def test_the_plans_lead_streams_run_first_on_one_thread(tiny_factory):
    path = tiny_factory("qwen3_moe")
    reference, default = _run(path, FineEP())
    mixed = [b for b in default if "compute" in b and "send" in b]
    assert mixed, "no step started a transfer and a compute node at once"
    assert all(_ordered(b, LEAD) for b in default)
    assert not all(_ordered(b, ("compute",)) for b in mixed)
    generated, swapped = _run(path, ComputeFirst())
    assert any("compute" in b and "send" in b for b in swapped)
    assert all(_ordered(b, ("compute",)) for b in swapped)
    assert_same_generation(generated, reference, 0.0)  # the order changes no value


def test_lead_travels_with_the_plan():
    from moeflow.dataflow import Cut, Placement, SeqChunk, Unit, compile
    from moeflow.models.families import spec_from_config
    from moeflow.models.tiny import tiny_config
    from moeflow.scheduler import topological_plan

    spec = spec_from_config(tiny_config("qwen3_moe"))
    unit = Unit((SeqChunk(0, 0, 3, "cpu:0"),))
    plan = topological_plan(compile(spec, unit, Placement.sharded(("cpu:0",), 8), Cut()))
    assert plan.lead == LEAD
    moved = dataclasses.replace(plan, lead=("compute", "send"))
    assert plan_from_wire(plan_to_wire(moved)).lead == ("compute", "send")
    # a name no stream of the plan has (nor a default one) would lead nothing: refused
    with pytest.raises(PlanError, match=r"lead names \['sned'\], which no stream"):
        dataclasses.replace(plan, lead=("sned",))
    with pytest.raises(PlanError, match="lead names a stream twice"):
        dataclasses.replace(plan, lead=("compute", "compute"))
