"""eps: passes the conformance suite with invariant 7 (adversarial routing included), with
PN chosen by the enabling rule, with PN forced above 1 and with two micro-batches, and gives
batch-ep's logits and greedy tokens with PN = 2 and 4 and with two micro-batches (alone and
with PN = 2), in process for every family and across actor processes."""

from __future__ import annotations

import pytest
import torch

from moeflow.actors.coordinator import ZmqExecutor
from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.dataflow.graph import SeqChunk, Unit
from moeflow.models.families import load_spec
from moeflow.scheduler import EPS, AnalyticCosts, BatchEP, Cluster
from moeflow.testing import check_scheduler
from moeflow.testing.conformance import assert_same_generation, record_generation
from moeflow.testing.eps import num_micro_batches, num_stages

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
            "gpt_oss")
PROMPTS = [[5, 17, 33, 2, 99, 250, 7, 8, 9, 10, 11, 300, 301], [8, 9, 10],
           [300, 301, 302, 303, 304, 305, 306, 40, 41], [77, 78]]
ATOL = 1e-4  # as the transformers oracle


class TwoStages(EPS):
    name = "eps-2"

    def __init__(self) -> None:
        super().__init__(stages=2)


class CheapStages(EPS):
    """Costs under which the rule turns pipelining on at a handful of rows: the suite's
    tiny units then cross the threshold both ways."""

    name = "eps-cheap-stages"

    def __init__(self) -> None:
        super().__init__(costs=AnalyticCosts(64, 32, 4, link_bandwidth=1e9, link_latency=2e-7,
                                             gemm_flops=1e10, gemm_half_rows=1, launch_s=1e-8,
                                             stage_overhead_s=1e-7))


class TwoMicroBatches(EPS):
    name = "eps-2x2"

    def __init__(self) -> None:
        super().__init__(stages=2, micro_batches=2)


@pytest.mark.parametrize("policy", [EPS, TwoStages, CheapStages, TwoMicroBatches])
def test_eps_passes_the_whole_suite_with_invariant_7(policy):
    check_scheduler(policy, max_examples=30, real_examples=3)


def generate(executor, spec, scheduler, cluster):
    return record_generation(executor, spec, scheduler, cluster, PROMPTS, 6)


def assert_same(run, reference):
    assert_same_generation(run, reference, ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_eps_matches_batch_ep_in_process(family, tiny_factory):
    path = tiny_factory(family)  # 8 experts: 4 per actor, so PN = 2 and 4 both split
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)

    def inproc():
        return InProcessExecutor(load_workers(path, spec, cluster.placement, torch.float32,
                                              4096), want_logits=True)

    reference = generate(inproc(), spec, BatchEP(), cluster)
    unit = Unit((SeqChunk(0, 0, 4, "cpu:0"), SeqChunk(1, 0, 4, "cpu:1")))
    for stages in (2, 4):
        eps = EPS(stages=stages)
        assert num_stages(eps.plan(unit, spec, cluster).graph) == stages
        assert_same(generate(inproc(), spec, eps, cluster), reference)
    # two sequences on each home: two chains, each pipelined or not
    pairs = Unit(tuple(SeqChunk(i, 0, 4, ("cpu:0", "cpu:1")[i % 2]) for i in range(4)))
    for stages in (1, 2):
        eps = EPS(stages=stages, micro_batches=2)
        graph = eps.plan(pairs, spec, cluster).graph
        assert (num_stages(graph), num_micro_batches(graph)) == (stages, 2)
        assert_same(generate(inproc(), spec, eps, cluster), reference)


@pytest.mark.timeout(300)
def test_eps_matches_batch_ep_across_actor_processes(tiny_factory):
    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    reference = generate(InProcessExecutor(load_workers(
        path, spec, cluster.placement, torch.float32, 4096), want_logits=True), spec,
        BatchEP(), cluster)
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096, want_logits=True) as zmq:
        assert_same(generate(zmq, spec, EPS(stages=2), cluster), reference)
        assert_same(generate(zmq, spec, EPS(micro_batches=2), cluster), reference)


class Recorded(EPS):
    """eps with a fixed kernel band, recording what its on_routing saw."""

    def __init__(self, band: tuple[int, int]) -> None:
        super().__init__(stages=2, kernel_band=band)
        self.seen: list[tuple[int, int, int]] = []  # (unit tokens, layer, rows counted)

    def on_routing(self, unit, layer, counts, groups):
        self.seen.append((unit.num_tokens, layer, sum(counts)))
        return super().on_routing(unit, layer, counts, groups)


@pytest.mark.parametrize("kernel,band", [("grouped", (1 << 30, 1 << 30)), ("dense", (0, 0))])
def test_on_routing_picks_every_actors_expert_kernel_and_results_do_not_change(
        tiny_factory, kernel, band):
    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)

    def workers():
        return load_workers(path, spec, cluster.placement, torch.float32, 4096)

    reference = generate(InProcessExecutor(workers(), want_logits=True), spec, BatchEP(),
                         cluster)
    eps = Recorded(band)
    ws = workers()
    ran = []
    for name, w in ws.items():
        real = w.run_group

        def spy(items, kernel=None, real=real, name=name):
            node = items[0][2]
            if type(node).__name__ == "Expert" and node.kind == "routed":
                ran.append((name, kernel))
            return real(items, kernel)

        w.run_group = spy
    executor = InProcessExecutor(ws, want_logits=True, on_routing=eps.on_routing)
    assert_same(generate(executor, spec, eps, cluster), reference)
    assert {name for name, _ in ran} == {"cpu:0", "cpu:1"}
    assert {k for _, k in ran} == {kernel}
    # each actor asked once per layer and unit, with the rows of every home's gate: those
    # from the other actor came with its dispatches
    top_k = spec.moe.top_k
    assert eps.seen and all(rows == tokens * top_k for tokens, _, rows in eps.seen)
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096, want_logits=True,
                     scheduler=Recorded(band)) as zmq:
        assert_same(generate(zmq, spec, Recorded(band), cluster), reference)


def test_a_scheduler_whose_on_routing_actors_cannot_get_is_refused(tiny_factory):
    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    eps = EPS()
    eps.unpicklable = lambda: None  # a lambda cannot travel to an actor process
    with pytest.raises(ValueError, match="cannot be pickled"):
        ZmqExecutor(str(path), cluster.placement, "float32", 4096, scheduler=eps)


def test_an_on_routing_that_fails_on_early_data_fails_its_unit_and_reports_it(tiny_factory):
    from moeflow.actors.cluster import JobSpec
    from moeflow.actors.messages import Data, NodeFailed, RunUnit

    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)

    def boom(unit, layer, counts, groups):
        raise RuntimeError("a bug in a plugin's on_routing")

    executor = InProcessExecutor(load_workers(path, spec, cluster.placement, torch.float32,
                                              4096), on_routing=boom)
    executor.actors["cpu:0"].on_routing = lambda *args: None  # cpu:1's alone fails
    plan = EPS(stages=1).plan(Unit((SeqChunk(0, 0, 5, "cpu:0"),)), spec, cluster)
    executor.submit(JobSpec(1, plan, {0: [5, 6, 7, 8, 9]}))
    held = next(o for o in executor.mail if o.to == "cpu:1" and isinstance(o.msg, RunUnit))
    executor.mail.remove(held)  # cpu:1 hears of the unit after cpu:0's dispatch arrives
    for _ in range(200):
        executor._run_ready()
        if any(o.to == "cpu:1" and isinstance(o.msg, Data) for o in executor.mail):
            break
        executor._deliver()
    executor._deliver()
    actor = executor.actors["cpu:1"]
    assert actor.early  # the dispatch, with its gate's counts, waits for the RunUnit
    out = actor.handle(held.msg)
    assert [type(o.msg) for o in out] == [NodeFailed]
    assert "a bug in a plugin's on_routing" in out[0].msg.error
    assert not actor.units and not actor.execution.plans
