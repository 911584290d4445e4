"""eps: how PN is chosen, the pipelined plan's shape and issue order, and invariant 7
catching broken variants in the simulator (the whole suite, with real runs, is in
tests/integration/test_eps.py)."""

from __future__ import annotations

import dataclasses

import pytest

from moeflow.dataflow.compiler import Cut, compile, cut_seqs
from moeflow.dataflow.graph import (
    Edge, Embed, Expert, Graph, GraphError, SeqChunk, Transfer, Unit,
)
from moeflow.models.families import spec_from_config
from moeflow.models.tiny import TinyShape, tiny_config
from moeflow.scheduler import EPS, AnalyticCosts, Cluster, InOrder, make_scheduler
from moeflow.scheduler.eps import LayerLoad, token_bucket
from moeflow.sim import models
from moeflow.sim.simulator import Simulator
from moeflow.sim.workload import Routing, SimRequest
from moeflow.testing import ConformanceError
from moeflow.testing.conformance import Case, check_simulated, policy_checks, simulate
from moeflow.testing.eps import invariant_7, num_micro_batches, num_stages, plan_problems
from moeflow.testing.strategies import ClusterCase, ModelCase, WorkloadCase, tight_hardware

# `make demo`'s checkpoint: Qwen3-MoE, 16 experts (top-4) of width 256 on two CPU actors
DEMO = spec_from_config(tiny_config("qwen3_moe", TinyShape(
    layers=4, experts=16, top_k=4, hidden=256, heads=8, kv_heads=2, head_dim=32,
    intermediate=256, vocab=2048), dtype="bfloat16"), "demo")


def prefill(num_tokens: int, devices: tuple[str, ...]) -> Unit:
    """`num_tokens` prompt tokens spread evenly over `devices`, one sequence each."""
    n = len(devices)
    return Unit(tuple(SeqChunk(i, 0, num_tokens // n, d) for i, d in enumerate(devices)))


def h800(spec, stage_overhead_s=30e-6):
    """H800-like figures (989 TFLOP/s bf16, 200 GB/s NVLink, ~20 µs an all-to-all)."""
    return AnalyticCosts(spec.hidden_size, spec.moe.intermediate_size, 2, link_bandwidth=200e9,
                         link_latency=20e-6, gemm_flops=989e12, gemm_half_rows=32,
                         launch_s=4e-6, stage_overhead_s=stage_overhead_s)


# -- choosing PN ------------------------------------------------------------------------


def test_eps_is_registered():
    assert isinstance(make_scheduler("eps"), EPS)


def test_token_buckets_are_powers_of_two_and_their_halves_between():
    assert [token_bucket(n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 4095, 4096)] == \
        [1, 2, 3, 4, 4, 6, 6, 8, 8, 12, 3072, 4096]


def test_decode_runs_unpipelined_and_a_long_prefill_pipelines_on_the_demo_shape():
    devices = ("cpu:0", "cpu:1")
    cluster = Cluster.sharded(devices, DEMO.moe.num_experts)
    eps = EPS()
    assert eps.chosen_stages(prefill(8, devices), DEMO, cluster) == 1
    choice = eps.choice(prefill(4096, devices), DEMO, cluster)
    assert choice.stages in (2, 4, 8) and choice.reason == "pipelined"
    assert choice.comm_ratio <= 1.32 and choice.gemm_ratio <= 1.03


def test_paper_scale_choices_with_h800_like_costs():
    # DeepSeek-V2 on 8 GPUs (20 experts each): the paper ran PN = 5; Mixtral with 2 experts
    # per GPU: 2. Below the threshold (a few hundred tokens per GPU): 1.
    ds = models.load("deepseek-v2")
    cluster = Cluster.sharded([f"cuda:{i}" for i in range(8)], ds.moe.num_experts)
    eps = EPS(costs=h800(ds))
    assert eps.chosen_stages(prefill(8 * 4096, cluster.devices), ds, cluster) == 5
    low = eps.choice(prefill(8 * 256, cluster.devices), ds, cluster)
    assert (low.stages, low.reason) == (1, "below the enabling threshold")
    mixtral = models.load("mixtral-8x7b")
    cluster = Cluster.sharded([f"cuda:{i}" for i in range(4)], mixtral.moe.num_experts)
    eps = EPS(costs=h800(mixtral))
    assert eps.chosen_stages(prefill(4 * 4096, cluster.devices), mixtral, cluster) == 2
    # one expert per GPU leaves nothing to split
    cluster = Cluster.sharded([f"cuda:{i}" for i in range(8)], mixtral.moe.num_experts)
    assert eps.chosen_stages(prefill(8 * 4096, cluster.devices), mixtral, cluster) == 1


def test_pn_is_the_divisor_nearest_sqrt_c_over_k_that_passes_the_rule():
    spec = models.load("deepseek-v2")
    cluster = Cluster.sharded([f"cuda:{i}" for i in range(8)], spec.moe.num_experts)
    unit = prefill(8 * 4096, cluster.devices)
    for k in (1e-6, 5e-6, 30e-6, 100e-6, 1e-3):
        eps = EPS(costs=h800(spec, k))
        choice = eps.choice(unit, spec, cluster)
        load = eps.load(unit, spec, cluster)
        assert choice.stages in load.divisors()
        c = min(choice.comm_s, choice.gemm_s)
        passing = [n for n in load.divisors() if n == 1 or eps.enabled(load, eps.costs, n)]
        best = min(load.divisors(), key=lambda n: (c / n + k * n, n))
        assert choice.stages == max(n for n in passing if n <= best)


def test_fixed_stages_round_down_to_a_divisor_of_every_owners_experts():
    spec = ModelCase("mixtral", 1, 8, 2).spec
    even = Cluster.sharded(("cpu:0", "cpu:1"), 8)  # 4 experts each
    unit = prefill(4, even.devices)
    assert [EPS(stages=s).chosen_stages(unit, spec, even) for s in (1, 2, 3, 4, 9)] == \
        [1, 2, 2, 4, 4]
    uneven = Cluster(("cpu:0", "cpu:1"), ClusterCase(("cpu:0", "cpu:1"),
                                                     (0, 0, 0, 0, 0, 0, 1, 1)).placement)
    assert EPS(stages=4).chosen_stages(unit, spec, uneven) == 2  # 6 and 2 experts
    with pytest.raises(ValueError):
        EPS(stages=0)


def test_one_plan_per_shape_and_bucket_and_pn_constant_within_a_bucket():
    devices = ("cpu:0", "cpu:1")
    cluster = Cluster.sharded(devices, DEMO.moe.num_experts)
    eps = EPS()
    for n in range(1, 3000, 7):
        unit = Unit((SeqChunk(0, 0, n, "cpu:0"),))
        bucket = Unit((SeqChunk(0, 0, token_bucket(n), "cpu:0"),))
        assert eps.plan_key(unit) == eps.plan_key(bucket)
        assert eps.chosen_stages(unit, DEMO, cluster) == eps.chosen_stages(bucket, DEMO, cluster)
    assert eps.plan_key(Unit((SeqChunk(0, 0, 100, "cpu:0"),))) != \
        eps.plan_key(Unit((SeqChunk(0, 0, 200, "cpu:0"),)))
    assert EPS(stages=2).plan_key(Unit((SeqChunk(0, 0, 100, "cpu:0"),))) == \
        EPS(stages=2).plan_key(Unit((SeqChunk(0, 0, 200, "cpu:0"),)))


def test_nothing_to_overlap_on_one_device():
    spec = ModelCase("olmoe", 1, 8, 2).spec
    cluster = Cluster.sharded(("cpu:0",), 8)
    choice = EPS().choice(prefill(4096, cluster.devices), spec, cluster)
    assert (choice.stages, choice.reason) == (1, "nothing to overlap")


def test_analytic_costs_gemm_efficiency_falls_for_few_rows():
    costs = AnalyticCosts(1024, 512)
    assert costs.comm_s(0) == costs.gemm_s(0, 4) == 0.0
    per_row = [costs.gemm_s(rows, 4) / rows for rows in (4, 64, 1024, 16384)]
    assert per_row == sorted(per_row, reverse=True)
    # splitting rows and experts alike costs only the launches
    load = LayerLoad(((4096.0, 2048.0, 8),))
    assert load.ratios(costs, 2)[1] == pytest.approx(
        (2 * costs.gemm_s(2048, 4)) / costs.gemm_s(4096, 8))
    with pytest.raises(ValueError):
        AnalyticCosts(0, 512)


# -- the plan ---------------------------------------------------------------------------


def kinds_in_order(plan, stream):
    out = []
    for i in plan.rule(stream).order:
        n = plan.graph.nodes[i]
        if isinstance(n, Transfer):
            out.append(f"{n.payload[0]}{n.stage}")
        elif isinstance(n, Expert) and n.kind == "routed":
            out.append(f"g{n.stage}")
    return out


def test_the_plan_pipelines_dispatch_gemm_combine_in_static_orders():
    spec = ModelCase("qwen2_moe", 1, 8, 2).spec
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), 8)
    plan = EPS(stages=4).plan(prefill(16, cluster.devices), spec, cluster)
    assert all(isinstance(rule, InOrder) for _, rule in plan.rules)
    assert num_stages(plan.graph) == 4 and plan_problems(plan) == []
    [send] = [s for s in plan.streams() if s.actor == "cpu:0" and s.name == "send"]
    [compute] = [s for s in plan.streams() if s.actor == "cpu:0" and s.name == "compute"]
    # dispatch(p+1) before combine(p): the next dispatch overlaps this stage's GEMM
    assert kinds_in_order(plan, send) == ["d0", "d1", "c0", "d2", "c1", "d3", "c2", "c3"]
    assert kinds_in_order(plan, compute) == ["g0", "g1", "g2", "g3"]
    # the barrier: layer l+1 waits for every device's layer l
    assert EPS(stages=1).plan(prefill(16, cluster.devices), spec, cluster).graph.edges == \
        make_scheduler("batch-ep").plan(prefill(16, cluster.devices), spec, cluster).graph.edges


# -- invariant 7 catches broken variants ------------------------------------------------

CASE = Case(ModelCase("qwen3_moe", layers=2, experts=8, top_k=2),
            ClusterCase(devices=("cpu:0", "cpu:1"), expert_owners=(0, 0, 0, 0, 1, 1, 1, 1)),
            WorkloadCase(requests=(SimRequest(0.0, 20, 3), SimRequest(0.0, 9, 2)),
                         max_batch_tokens=32, max_seqs=4, kv_blocks=4, routing="remote",
                         seed=0))


class Two(EPS):
    name = "eps-two"

    def __init__(self) -> None:
        super().__init__(stages=2)


def rebuilt(plan, nodes=None, edges=None):
    g = plan.graph
    graph = Graph(g.unit, g.placement, tuple(nodes or g.nodes), tuple(edges or g.edges),
                  g.num_layers)
    return dataclasses.replace(plan, graph=graph)


class OverlappingGroups(Two):
    """Broken: each owner's first group also computes the first expert of its second."""

    def plan(self, unit, model, cluster):
        plan = super().plan(unit, model, cluster)
        nodes = list(plan.graph.nodes)
        for n in plan.graph.nodes:
            if isinstance(n, Expert) and n.kind == "routed" and n.stage == 1:
                first = next(m for m in nodes if isinstance(m, Expert) and m.kind == "routed"
                             and m.layer == n.layer and m.device == n.device and m.stage == 0)
                nodes[first.id] = dataclasses.replace(first, experts=first.experts
                                                      + n.experts[:1])
        return rebuilt(plan, nodes=nodes)


class CombinesBeforeItsGemm(Two):
    """Broken: a combine goes back as soon as its rows have arrived at the owner (it reads
    their dispatch instead of the GEMM), before the GEMM has run."""

    def plan(self, unit, model, cluster):
        plan = super().plan(unit, model, cluster)
        g = plan.graph
        dispatch = {(n.layer, n.src, n.dst, n.stage): n.id for n in g.nodes
                    if isinstance(n, Transfer) and n.payload == "dispatch"}

        def rewired(e):
            c = g.nodes[e.dst]
            if isinstance(c, Transfer) and c.payload == "combine":
                return Edge(dispatch[(c.layer, c.dst, c.src, c.stage)], e.dst)
            return e

        return rebuilt(plan, edges=[rewired(e) for e in g.edges])


class NoOverlap(Two):
    """Broken: each sender issues combine(p) before dispatch(p+1): the stages serialise and
    nothing overlaps (still correct, and deadlock-free)."""

    def plan(self, unit, model, cluster):
        plan = super().plan(unit, model, cluster)
        g = plan.graph

        def key(i):
            n = g.nodes[i]
            stage = n.stage if isinstance(n, Transfer) else 0
            return (getattr(n, "layer", -1), stage, isinstance(n, Transfer) and
                    n.payload == "combine")

        rules = tuple((s, InOrder(tuple(sorted(r.order, key=key))) if s.name == "send" else r)
                      for s, r in plan.rules)
        return dataclasses.replace(plan, rules=rules)


class IgnoresThreshold(EPS):
    """Broken: pipelines whatever the enabling rule says (under costs where splitting is
    cheap to schedule, k ≈ 0, but each message costs a millisecond)."""

    name = "eps-ignores-threshold"

    def __init__(self) -> None:
        super().__init__(costs=AnalyticCosts(64, 32, link_latency=1e-3, stage_overhead_s=1e-9))

    def enabled(self, load, costs, stages):
        return True


def run_unchecked(cls, case):
    """The simulated run of `simulate`, without its check that each graph is well formed
    (so that invariant 7 itself must see what is wrong)."""
    spec, placement, w = case.model.spec, case.cluster.placement, case.workload
    hw = tight_hardware(spec, placement, w.kv_blocks, w.max_batch_tokens, w.max_seqs)
    routing = Routing.parse(w.routing, spec.moe.num_experts, spec.moe.top_k, spec.num_layers,
                            seed=w.seed)
    sim = Simulator(spec, hw, cls(), routing, placement=placement,
                    max_batch_tokens=w.max_batch_tokens, max_seqs=w.max_seqs)
    return sim.run(w.requests)


@pytest.mark.parametrize("cls", [EPS, Two])
def test_eps_keeps_invariant_7_on_the_fixed_case(cls):
    check_simulated(cls, CASE, policy_checks(cls))
    _, result = simulate(cls, CASE)
    assert {num_stages(job.plan.graph) for job in result.jobs} == ({2} if cls is Two else {1})


def test_invariant_7_catches_overlapping_groups():
    found = invariant_7(CASE, run_unchecked(OverlappingGroups, CASE))
    assert any("groups overlap: experts [2, 6]" in f for f in found), found
    with pytest.raises(ConformanceError):  # the suite stops it earlier still (invariant 1)
        check_simulated(OverlappingGroups, CASE, policy_checks(OverlappingGroups))


def test_invariant_7_catches_a_combine_before_its_gemm():
    found = invariant_7(CASE, run_unchecked(CombinesBeforeItsGemm, CASE))
    assert any("combine(0)" in f and "before its GEMM ended" in f for f in found), found


def test_invariant_7_catches_a_plan_that_does_not_overlap_the_next_dispatch():
    with pytest.raises(ConformanceError, match=r"invariant 7: unit 0: cpu:\d/send issues "
                                               r"combine\(0\) of layer 0 before dispatch\(1\)"):
        check_simulated(NoOverlap, CASE, policy_checks(NoOverlap))


def test_invariant_7_catches_pipelining_below_the_threshold():
    with pytest.raises(ConformanceError, match=r"invariant 7: unit 0 runs PN=\d below the "
                                               r"enabling threshold"):
        check_simulated(IgnoresThreshold, CASE, policy_checks(IgnoresThreshold))


def test_a_paper_scale_prefill_pipelines_in_the_simulator():
    from moeflow.sim import hardware

    spec = models.load("olmoe-1b-7b")  # 64 experts: 8 per GPU on 8 GPUs
    hw = hardware.load("h100x8")
    eps = EPS(costs=h800(spec))
    routing = Routing.parse("uniform", spec.moe.num_experts, spec.moe.top_k, spec.num_layers)
    result = Simulator(spec, hw, eps, routing, max_batch_tokens=32768).run(
        [SimRequest(0.0, 4096, 2) for _ in range(8)])
    assert len(result.timings) == 8
    assert num_stages(result.jobs[0].plan.graph) > 1  # the prefill
    assert num_stages(result.jobs[-1].plan.graph) == 1  # the decode
    assert invariant_7(None, result) == []


# -- the kernel choice ------------------------------------------------------------------


def test_on_routing_picks_grouped_below_the_band_dense_above_and_holds_between():
    eps = EPS(kernel_band=(50, 100))  # rows per expert of the group
    unit = prefill(8, ("cpu:0",))
    groups = ((0, 1), (2, 3))

    def choose(rows0, rows1, layer=0):
        return eps.on_routing(unit, layer, (rows0, 0, rows1, 0), groups)

    assert choose(10, 150) == {(0, 1): "grouped", (2, 3): "grouped"}  # none chose yet
    assert choose(250, 150) == {(0, 1): "dense", (2, 3): "grouped"}
    # inside the band, each group keeps its last kernel: no flip at the crossover
    assert choose(150, 199) == {(0, 1): "dense", (2, 3): "grouped"}
    assert choose(99, 201) == {(0, 1): "grouped", (2, 3): "dense"}
    assert choose(150, 150, layer=1) == {(0, 1): "grouped", (2, 3): "grouped"}  # per layer
    with pytest.raises(ValueError, match="kernel_band"):
        EPS(kernel_band=(10, 5))
    assert EPS(kernel_band=None).on_routing(unit, 0, (1, 0, 1, 0), groups) is None


def test_an_on_routing_answer_is_checked():
    from moeflow.scheduler.base import checked_adjustments

    groups = ((0, 1), (2, 3))
    assert checked_adjustments(None, groups) is None
    assert checked_adjustments({(0, 1): "dense"}, groups) == {(0, 1): "dense"}
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        checked_adjustments({(0, 1): "fast"}, groups)
    with pytest.raises(ValueError, match=r"\(1, 2\) is not one of the layer's expert groups"):
        checked_adjustments({(1, 2): "dense"}, groups)
    with pytest.raises(TypeError, match="must return a dict or None"):
        checked_adjustments([((0, 1), "dense")], groups)


def test_the_simulator_runs_experts_on_the_kernel_on_routing_chose():
    from moeflow.sim import hardware

    spec = models.load("olmoe-1b-7b")
    hw = hardware.load("h100x8")
    routing = Routing.parse("uniform", spec.moe.num_experts, spec.moe.top_k, spec.num_layers)
    requests = [SimRequest(0.0, 4096, 2) for _ in range(8)]
    results = {}
    for band in ((1 << 30, 1 << 30), (0, 0)):  # always grouped, always dense
        eps = EPS(costs=h800(spec), kernel_band=band)
        results[band] = Simulator(spec, hw, eps, routing, max_batch_tokens=32768).run(
            requests)
    grouped, dense = results[(1 << 30, 1 << 30)], results[(0, 0)]
    assert set(grouped.kernels) == set(range(spec.num_layers))
    assert all(set(k) == {"grouped"} for k in grouped.kernels.values())
    assert all(set(k) == {"dense"} for k in dense.kernels.values())
    # dense launches a GEMM per expert: the same work, more launches
    assert dense.metrics.makespan > grouped.metrics.makespan
    batch = Simulator(spec, hw, make_scheduler("batch-ep"), routing,
                      max_batch_tokens=32768).run(requests)
    assert batch.kernels == {}


# -- micro-batches (two-batch overlap) ------------------------------------------------------

PAIRS_CASE = dataclasses.replace(CASE, workload=dataclasses.replace(
    CASE.workload, requests=tuple(SimRequest(0.0, 6, 2) for _ in range(4)), kv_blocks=8))


def pairs(tokens: int, devices: tuple[str, ...]) -> Unit:
    """Two sequences of `tokens` prompt tokens on each of `devices`."""
    return Unit(tuple(SeqChunk(2 * i + j, 0, tokens, d) for i, d in enumerate(devices)
                      for j in range(2)))


def test_micro_batches_cut_each_homes_sequences_into_chains_of_their_own():
    spec = ModelCase("qwen3_moe", 2, 8, 2).spec
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), 8)
    unit = Unit((SeqChunk(0, 0, 3, "cpu:0"), SeqChunk(1, 0, 2, "cpu:1"),
                 SeqChunk(2, 0, 4, "cpu:0"), SeqChunk(3, 0, 1, "cpu:0")))
    graph = compile(spec, unit, cluster.placement, Cut(barrier=True, micro_batches=2))
    assert graph.micro_batched
    # cpu:0's sequences 0, 2, 3 dealt into two chains in turn; cpu:1's one in one
    assert graph.micro_batch_of_seq == {0: 0, 2: 1, 3: 0, 1: 0}
    assert sorted((n.device, n.seqs) for n in graph.nodes if isinstance(n, Embed)) == \
        [("cpu:0", (0, 3)), ("cpu:0", (2,)), ("cpu:1", (1,))]
    # prefills and decodes dealt apart: each micro-batch gets one of each
    mixed = Unit((SeqChunk(0, 5, 1, "cpu:0"), SeqChunk(1, 7, 1, "cpu:0"),
                  SeqChunk(2, 0, 9, "cpu:0"), SeqChunk(3, 0, 9, "cpu:0")))
    assert cut_seqs(mixed, (0, 1, 2, 3), 2) == [(0, 2), (1, 3)]
    for n in graph.nodes:
        if isinstance(n, Expert) and n.kind == "routed":  # rows of its own micro-batch only
            homes = {graph.nodes[g].device for g in graph.gates_read(n.id)}
            assert homes == ({"cpu:0", "cpu:1"} if n.micro_batch == 0 else {"cpu:0"})
            assert {graph.micro_batch_of_seq[graph.nodes[g].seqs[0]]
                    for g in graph.gates_read(n.id)} == {n.micro_batch}
    one = compile(spec, unit, cluster.placement, Cut(barrier=True, micro_batches=1))
    assert one == compile(spec, unit, cluster.placement, Cut(barrier=True))
    assert not one.micro_batched
    with pytest.raises(GraphError, match="micro_batches must be >= 1"):
        Cut(micro_batches=0)


def test_two_micro_batches_overlap_one_anothers_transfers_in_the_issue_order():
    spec = ModelCase("qwen2_moe", 2, 8, 2).spec  # with a shared expert
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), 8)
    plan = EPS(micro_batches=2).plan(pairs(8, cluster.devices), spec, cluster)
    assert num_micro_batches(plan.graph) == 2 and plan_problems(plan) == []
    [compute] = [s for s in plan.streams() if s.actor == "cpu:0" and s.name == "compute"]
    [send] = [s for s in plan.streams() if s.actor == "cpu:0" and s.name == "send"]
    of_seq = plan.graph.micro_batch_of_seq

    def label(n):
        if isinstance(n, (Expert, Transfer)):
            kind = n.kind if isinstance(n, Expert) else n.payload
            return f"{kind}{n.micro_batch}"
        return f"{type(n).__name__}{of_seq[n.seqs[0]]}"

    def layer(stream, at):
        return [label(plan.graph.nodes[i]) for i in plan.rule(stream).order
                if getattr(plan.graph.nodes[i], "layer", None) == at]

    # micro-batch 1 attends while micro-batch 0's rows cross; 0's GEMM runs while 1's do;
    # each Combine comes just before its micro-batch's attention of the next layer
    assert layer(compute, 0) == ["Attention0", "Gate0", "shared0", "Attention1", "Gate1",
                                 "shared1", "routed0", "routed1", "Combine0", "Combine1"]
    order = [(label(plan.graph.nodes[i]), getattr(plan.graph.nodes[i], "layer", None))
             for i in plan.rule(compute).order]
    at = order.index(("Combine0", 0))
    assert order[at - 1:at + 4] == [("routed1", 0), ("Combine0", 0), ("Attention0", 1),
                                    ("Gate0", 1), ("shared0", 1)]
    assert layer(send, 0) == ["dispatch0", "dispatch1", "combine0", "combine1"]


class SerialMicroBatches(EPS):
    """Broken: two micro-batches, each layer's run one after the other (micro-batch 0's
    GEMMs before micro-batch 1 attends): correct, but nothing overlaps."""

    name = "eps-serial-micro-batches"

    def __init__(self) -> None:
        super().__init__(micro_batches=2)

    def plan(self, unit, model, cluster):
        plan = super().plan(unit, model, cluster)
        g = plan.graph
        of_seq = g.micro_batch_of_seq
        topo = {node: i for i, node in enumerate(g.topological_order())}

        def key(i):
            n = g.nodes[i]
            m = n.micro_batch if isinstance(n, (Expert, Transfer)) else of_seq.get(
                (getattr(n, "seqs", None) or (0,))[0], 0)
            layer = getattr(n, "layer", -1 if isinstance(n, Embed) else g.num_layers)
            return (layer, m, topo[i])

        rules = tuple((s, InOrder(tuple(sorted(r.order, key=key)))) for s, r in plan.rules)
        return dataclasses.replace(plan, rules=rules)


def test_eps_keeps_invariant_7_with_two_micro_batches():
    cls = type("TwoByTwo", (EPS,), {"name": "eps-2x2",
                                    "__init__": lambda self: EPS.__init__(self, micro_batches=2)})
    check_simulated(cls, PAIRS_CASE, policy_checks(cls))
    _, result = simulate(cls, PAIRS_CASE)
    assert {num_micro_batches(job.plan.graph) for job in result.jobs} == {2}


def test_invariant_7_catches_micro_batches_that_do_not_overlap():
    with pytest.raises(ConformanceError, match=r"invariant 7: unit 0: cpu:\d/compute issues "
                                               r"the GEMMs of layer 0 micro-batch 0 before "
                                               r"micro-batch 1's attention"):
        check_simulated(SerialMicroBatches, PAIRS_CASE, policy_checks(SerialMicroBatches))


def test_micro_batches_are_chosen_only_where_every_home_holds_two_sequences():
    devices = ("cpu:0", "cpu:1")
    cluster = Cluster.sharded(devices, DEMO.moe.num_experts)
    eps = EPS()
    assert eps.choice(pairs(2048, devices), DEMO, cluster).micro_batches == 2
    assert eps.choice(pairs(2048, devices), DEMO, cluster).reason == "micro-batched"
    assert eps.choice(prefill(8192, devices), DEMO, cluster).micro_batches == 1  # one each
    decode = Unit(tuple(SeqChunk(i, 9, 1, devices[i % 2]) for i in range(8)))
    assert eps.choice(decode, DEMO, cluster).micro_batches == 1  # below the threshold
    assert EPS(stages=2).choice(pairs(2048, devices), DEMO, cluster).micro_batches == 1
    fixed = EPS(micro_batches=3).choice(pairs(2048, devices), DEMO, cluster)
    assert fixed.micro_batches == 2  # no more than the sequences of a home
    # PN, where it is left to the rule, is chosen at a micro-batch's share of the tokens
    assert EPS().stage_choice(pairs(256, devices), DEMO, cluster).stages == 2
    assert EPS(micro_batches=2).choice(pairs(256, devices), DEMO, cluster).stages == 1
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        EPS(micro_batches=0)


def test_eps_takes_long_prompts_in_halves_only_when_every_home_gets_two():
    from moeflow.scheduler.base import Budget, RequestView

    def views(n, computed=0):
        return [RequestView(i, 4096, computed, 0, 1, 0.0)
                for i in range(n)]

    budget = Budget(8192, 64, {"cpu:0": 1024, "cpu:1": 1024}, 16)
    [unit] = EPS().form_units(views(4), [], budget)
    assert [s.num_tokens for s in unit.seqs] == [2048] * 4
    assert sorted(s.home for s in unit.seqs) == ["cpu:0", "cpu:0", "cpu:1", "cpu:1"]
    [unit] = EPS().form_units(views(3), [], budget)  # too few to pair up: whole budget
    assert [s.num_tokens for s in unit.seqs] == [4096, 4096]
    for whole in (EPS(micro_batches=1), EPS(stages=2), make_scheduler("batch-ep")):
        [unit] = whole.form_units(views(4), [], budget)
        assert [s.num_tokens for s in unit.seqs] == [4096, 4096]
    # a lone prompt among decodes: nothing to pair it with, so it is not cut
    decoding = [dataclasses.replace(v, seq_id=10 + v.seq_id, home=("cpu:0", "cpu:1")[i % 2])
                for i, v in enumerate(views(3, computed=4096))]
    decoding = [dataclasses.replace(v, num_output=1) for v in decoding]
    [unit] = EPS().form_units(views(1), decoding, budget)
    assert [s.num_tokens for s in unit.seqs] == [1, 1, 1, 4096]
