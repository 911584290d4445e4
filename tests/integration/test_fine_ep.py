"""fine-ep: passes the conformance suite with invariant 6 (adversarial routing included),
gives batch-ep's results in process and across actor processes, and coalesces for real."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeflow.actors.coordinator import ZmqExecutor
from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.models.families import load_spec
from moeflow.dataflow.graph import Expert
from moeflow.scheduler import BatchEP, Cluster, FineEP
from moeflow.scheduler.fine_ep import delegated
from moeflow.sim import hardware, models
from moeflow.sim.simulator import Simulator
from moeflow.sim.workload import Lengths, Routing, SimRequest, requests
from moeflow.testing import ConformanceError, check_scheduler
from moeflow.testing.conformance import (
    Case, check_simulated, policy_checks, record_generation, simulate,
)
from moeflow.testing.fine_ep import invariant_6
from moeflow.testing.strategies import ClusterCase, ModelCase, WorkloadCase

PROMPTS = [[5, 17, 33, 2, 99, 250, 7], [8, 9, 10], [300, 301, 302, 303, 304, 305, 306, 40, 41],
           [77, 78]]


def test_fine_ep_passes_the_whole_suite_with_invariant_6():
    check_scheduler(FineEP)


class LocalFirst(FineEP):
    """Broken: local work before delegated expert tasks."""

    name = "local-first"

    def plan(self, unit, model, cluster):
        plan = super().plan(unit, model, cluster)
        flipped = tuple((1.0 - k[0], *k[1:]) for k in plan.priority)
        return dataclasses.replace(plan, priority=flipped)


def test_invariant_6_catches_a_policy_that_serves_local_work_first():
    # two one-token inputs homed on different actors; with this seed's routing a delegated
    # task arrives where the other input still has local work ready (the correct policy
    # passes the same case, so it tells the two apart)
    case = Case(ModelCase("mixtral", layers=1, experts=4, top_k=1),
                ClusterCase(devices=("cpu:0", "cpu:1", "cpu:2", "cpu:3"),
                            expert_owners=(0, 1, 2, 3)),
                WorkloadCase(requests=(SimRequest(0.0, 1, 1), SimRequest(0.0, 1, 1)),
                             max_batch_tokens=8, max_seqs=2, kv_blocks=1, routing="uniform",
                             seed=1))
    check_simulated(FineEP, case, policy_checks(FineEP))
    with pytest.raises(ConformanceError, match="invariant 6: on cpu:.*local task .* while "
                                               "delegated task .* was ready"):
        check_simulated(LocalFirst, case, policy_checks(LocalFirst))


def test_sequences_that_take_turns_in_flight_do_not_evict_each_other():
    # a KV squeeze under fine-ep's one-input units terminates (the eviction rule that keeps
    # two sequences taking turns in flight from evicting each other for ever is pinned on
    # the request book itself in tests/unit/test_preemption.py)
    case = Case(ModelCase("mixtral", layers=1, experts=2, top_k=1),
                ClusterCase(devices=("cpu:0",), expert_owners=(0, 0)),
                WorkloadCase(requests=(SimRequest(0.0, 26, 8), SimRequest(0.0, 10, 8)),
                             max_batch_tokens=32, max_seqs=2, kv_blocks=3, routing="uniform",
                             seed=0))
    check_simulated(FineEP, case, policy_checks(FineEP))
    _, result = simulate(FineEP, case)
    assert len(result.timings) == 2
    assert result.metrics.num_preemptions >= 1  # the case does squeeze


def generate(executor, spec, scheduler, cluster):
    return record_generation(executor, spec, scheduler, cluster, PROMPTS, 8)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"])
def test_fine_ep_matches_batch_ep_in_process_and_across_actor_processes(family, tiny_factory):
    path = tiny_factory(family)
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)

    def inproc():
        return InProcessExecutor(load_workers(path, spec, cluster.placement, torch.float32,
                                              4096), want_logits=True)

    ref_tokens, ref_logits = generate(inproc(), spec, BatchEP(), cluster)
    runs = [generate(inproc(), spec, FineEP(), cluster)]
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096, want_logits=True) as zmq:
        runs.append(generate(zmq, spec, FineEP(), cluster))
    for tokens, logits in runs:
        assert tokens == ref_tokens
        for request, rows in ref_logits.items():
            for a, b in zip(logits[request], rows):
                assert (a - b).abs().max() <= 1e-4


def test_decodes_at_the_same_layer_coalesce_in_the_simulator():
    spec = models.load("olmoe-1b-7b")
    routing = Routing.parse("uniform", spec.moe.num_experts, spec.moe.top_k, spec.num_layers)
    sim = Simulator(spec, hardware.load("h100x8"), FineEP(), routing)
    result = sim.run(requests("burst", 16, Lengths.parse("fixed:32"), Lengths.parse("fixed:8")))
    sizes: dict[int, int] = {}
    for ev in result.trace:
        sizes[ev.group] = sizes.get(ev.group, 0) + 1
    # inputs homed on 8 devices meet at each expert owner: their tasks of one layer run as
    # one kernel
    assert max(sizes.values()) >= 4
    assert len(result.timings) == 16


def test_local_tasks_ride_with_delegated_ones_when_no_other_delegated_task_waits():
    """An expert group's local and delegated tasks run as one kernel (its weights read once)
    when they are ready together and no other delegated task waits on the stream: the
    conformance suite's invariant 6 holds all the same (delegated-first)."""
    spec = models.load("olmoe-1b-7b")
    routing = Routing.parse("uniform", spec.moe.num_experts, spec.moe.top_k, spec.num_layers)
    result = Simulator(spec, hardware.load("h100x8"), FineEP(), routing).run(
        requests("burst", 16, Lengths.parse("fixed:32"), Lengths.parse("fixed:8")))
    roles: dict[int, set[bool]] = {}
    for ev in result.trace:
        graph = result.jobs[ev.job].plan.graph
        node = graph.nodes[ev.node]
        if isinstance(node, Expert) and node.kind == "routed":
            roles.setdefault(ev.group, set()).add(delegated(graph, node))
    assert sum(len(r) == 2 for r in roles.values()) > 0
    assert invariant_6(None, result) == []


def test_the_in_process_executor_runs_coalesced_groups_as_one_kernel(tiny_factory):
    path = tiny_factory("qwen2_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    executor = InProcessExecutor(load_workers(path, spec, cluster.placement, torch.float32,
                                              4096), want_logits=True)
    groups: list[int] = []
    for actor in executor.actors.values():
        run = actor.run
        actor.run = lambda group, run=run: groups.append(len(group)) or run(group)
    tokens, _ = generate(executor, spec, FineEP(), cluster)
    assert max(groups) > 1
    assert tokens == generate(InProcessExecutor(load_workers(
        path, spec, cluster.placement, torch.float32, 4096), want_logits=True), spec,
        BatchEP(), cluster)[0]


@pytest.mark.parametrize("policy", [FineEP, BatchEP])
def test_plans_cross_the_wire_whole(policy):
    """Actor processes get the plan the scheduler made: rules with their coalescing and
    fifo flags, priorities and merge keys, not a plainer one."""
    from moeflow.actors.messages import RunUnit, decode, encode
    from moeflow.dataflow.graph import SeqChunk, Unit

    spec = models.load("olmoe-1b-7b")
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    plan = policy().plan(Unit((SeqChunk(7, 0, 5, "cpu:1"),)), spec, cluster)
    msg = RunUnit(3, plan, {0: [1, 2, 3, 4, 5]}, {}, True)
    back = decode([f.bytes if hasattr(f, "bytes") else f for f in encode(msg)])
    assert back.plan == plan
