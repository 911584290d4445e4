"""cgopipe: Algorithm 2's micro-batches, the offloaded graph (split attention, weight pages,
the double buffer's write-after-read edges), the paper's issue order, and the simulator
running the four resources side by side (the suite and real runs are in
tests/integration/test_cgopipe.py)."""

from __future__ import annotations

import pytest

from moeflow.dataflow.check import problems
from moeflow.dataflow.graph import (
    Attention, Expert, Graph, GraphError, SeqChunk, Transfer, Unit,
)
from moeflow.dataflow.offload import OffloadCut, compile_offload, offloaded_pages, page_columns
from moeflow.models.families import spec_from_config
from moeflow.models.tiny import TinyShape, tiny_config
from moeflow.scheduler import Cluster
from moeflow.scheduler.cgopipe import CGOPipe, FlexGen, algorithm2, pack_by_tokens
from moeflow.sim.cost import CostModel
from moeflow.sim.hardware import load as load_hardware
from moeflow.sim.simulator import Simulator
from moeflow.sim.workload import Routing, SimRequest
from moeflow.testing.cgopipe import graph_problems, invariant_8
from moeflow.testing.strategies import tight_hardware

SPEC = spec_from_config(tiny_config("qwen3_moe", TinyShape(layers=4, experts=8, top_k=2)),
                        "tiny")
CLUSTER = Cluster.sharded(("cpu:0", "cpu:1"), 8)


def decode(lengths: list[int], home: str = "cpu:0") -> Unit:
    return Unit(tuple(SeqChunk(i, n, 1, home) for i, n in enumerate(lengths)))


def test_algorithm2_puts_the_longest_first_into_the_lightest_micro_batch():
    unit = decode([100, 10, 90, 20, 80, 30, 5])
    batches = algorithm2(unit, 3, None)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(list(b) == sorted(b) for b in batches)
    load = [sum(unit.seqs[i].start + 1 for i in b) for b in batches]
    assert max(load) - min(load) <= 100  # at most the longest apart
    # 101, 91, 81 open the three; 31 joins the lightest (81), 21 then 91, 11 then 101, ...
    assert batches == ((0, 1, 6), (2, 3), (4, 5))


def test_algorithm2_closes_a_micro_batch_at_its_size():
    batches = algorithm2(decode([5] * 7), None, 2)
    assert len(batches) == 4 and max(len(b) for b in batches) == 2
    assert algorithm2(decode([5, 6]), 3, None) == ((0,), (1,))  # no more than sequences


def test_a_token_budget_sizes_micro_batches_and_keeps_the_pipeline_full():
    fresh = Unit(tuple(SeqChunk(i, 0, 10, "cpu:0") for i in range(6)))  # 60 new tokens
    assert len(pack_by_tokens(fresh, 25, 8)) == 3  # two prompts a micro-batch
    assert pack_by_tokens(fresh, 60, 8) == (tuple(range(6)),)  # nothing to overlap
    # a decode step: one new token a request, so the budget alone would take 1; the host
    # attends, so 3 keep the pipeline full, or HRM's n_ub if that is fewer
    assert [len(b) for b in pack_by_tokens(decode([5] * 40), 100, 18)] == [14, 13, 13]
    assert len(pack_by_tokens(decode([5] * 40), 100, 2)) == 2
    assert len(pack_by_tokens(decode([5] * 40), 10, 18)) == 4  # the budget needs 4
    assert pack_by_tokens(decode([5, 6]), 100, 18) == ((0,), (1,))  # no more than sequences
    # prompts that fill the budget keep their micro-batches to themselves (prefilled whole
    # on the GPU); the decodes beside them get their own
    mixed = Unit(tuple(SeqChunk(i, 0, 100, "cpu:0") for i in range(2))
                 + tuple(SeqChunk(i, 50, 1, "cpu:0") for i in range(2, 8)))
    batches = pack_by_tokens(mixed, 100, 18)
    assert (0,) in batches and (1,) in batches and len(batches) == 3
    assert pack_by_tokens(Unit((SeqChunk(0, 0, 300, "cpu:0"),)), 100, 18) == ((0,),)
    # as HRM's policy is taken: a step of decodes alone packed by tokens, any other unit
    # in micro-batches of μ requests (Algorithm 2)
    policy = CGOPipe(micro_batches=18, micro_batch_size=2, micro_batch_tokens=100)
    assert policy.split(decode([5] * 40)) == pack_by_tokens(decode([5] * 40), 100, 18)
    assert policy.split(mixed) == algorithm2(mixed, None, 2)
    assert policy.split(fresh) == algorithm2(fresh, None, 2)


def test_the_offloaded_graph_is_a_correct_forward_pass_with_pages_that_tile_the_layer():
    unit = decode([7, 9, 11, 13, 15])
    cut = OffloadCut("cpu:0", "cpu:1", algorithm2(unit, 3, None), pages=2)
    graph, ids = compile_offload(SPEC, unit, CLUSTER.placement, cut)
    assert problems(graph, SPEC) == []
    offloaded = set(CLUSTER.placement.experts_of("cpu:1"))
    for layer in range(SPEC.num_layers):
        pages = [graph.nodes[p] for p in ids.pages[layer]]
        assert len(pages) == 2 and all(p.src == "cpu:1" and p.dst == "cpu:0" for p in pages)
        assert sorted(e for p in pages for e in p.experts) == sorted(offloaded)
        for page in pages:  # the double buffer: layer - 2's experts are done with its half
            war = {e.src for e in graph.edges if e.dst == page.id and e.kind == "war"}
            two_back = {n.id for n in graph.nodes if isinstance(n, Expert)
                        and n.kind == "routed" and n.layer == layer - 2}
            assert war == two_back
    cores = [n for n in graph.nodes if isinstance(n, Attention) and n.part == "core"]
    assert {c.device for c in cores} == {"cpu:1"} and len(cores) == 3 * SPEC.num_layers


def test_pages_are_whole_experts_while_they_last_then_slices_of_every_expert():
    placement = CLUSTER.placement  # cpu:1 owns experts 4-7
    assert offloaded_pages(placement, "cpu:0", 2, 10) == [
        ("cpu:1", (4, 5), (0, 1)), ("cpu:1", (6, 7), (0, 1))]
    assert offloaded_pages(placement, "cpu:0", 4, 10) == [
        ("cpu:1", (e,), (0, 1)) for e in (4, 5, 6, 7)]
    sliced = offloaded_pages(placement, "cpu:0", 6, 10)
    assert sliced == [("cpu:1", (4, 5, 6, 7), (k, 6)) for k in range(6)]
    columns = [page_columns(part, 10) for _, _, part in sliced]
    assert columns[0][0] == 0 and columns[-1][1] == 10  # they tile the width, in order,
    assert all(a[1] == b[0] for a, b in zip(columns, columns[1:]))  # near-equal
    assert {end - start for start, end in columns} == {1, 2}
    # never more slices than columns
    assert len(offloaded_pages(placement, "cpu:0", 6, 3)) == 3
    with pytest.raises(GraphError, match="part must be"):
        Transfer(0, "cpu:1", ("cpu:0",), 0, "weights", experts=(4,), part=(2, 2))


def test_sliced_pages_tile_every_offloaded_expert_and_cost_their_share():
    unit = decode([7, 9, 11, 13, 15])
    cut = OffloadCut("cpu:0", "cpu:1", algorithm2(unit, 5, None), pages=5)
    graph, ids = compile_offload(SPEC, unit, CLUSTER.placement, cut)
    assert problems(graph, SPEC) == [] and graph_problems(graph, "cpu:0") == []
    pages = [graph.nodes[p] for p in ids.pages[0]]
    assert [p.part for p in pages] == [(k, 5) for k in range(5)]
    assert all(p.experts == (4, 5, 6, 7) for p in pages)
    cost = CostModel(SPEC, load_hardware("t4"))
    whole = cost.cost(graph, Transfer(0, "cpu:1", ("cpu:0",), 0, "weights", experts=(4, 5, 6, 7)))
    assert sum(cost.cost(graph, p).bytes for p in pages) == pytest.approx(whole.bytes)
    # a page that lost a slice, or holds one twice, is caught
    broken = graph.nodes[:ids.pages[0][0]] + (
        Transfer(ids.pages[0][0], "cpu:1", ("cpu:0",), 0, "weights", experts=(4, 5, 6, 7),
                 part=(1, 5)),) + graph.nodes[ids.pages[0][0] + 1:]
    lost = Graph(graph.unit, graph.placement, broken, graph.edges, graph.num_layers)
    assert any("not each of its 5 once" in p for p in graph_problems(lost, "cpu:0"))


def test_the_offloaded_graph_refuses_what_it_cannot_run():
    unit = decode([3, 4])
    with pytest.raises(GraphError, match="exactly once"):
        compile_offload(SPEC, unit, CLUSTER.placement, OffloadCut("cpu:0", "cpu:1", ((0,),)))
    with pytest.raises(GraphError, match="homes every sequence on the GPU"):
        compile_offload(SPEC, decode([3, 4], "cpu:1"), CLUSTER.placement,
                        OffloadCut("cpu:0", "cpu:1", ((0, 1),)))


def test_mla_keeps_attention_whole_and_flexgen_never_splits_it():
    mla = spec_from_config(tiny_config("deepseek_v2", TinyShape(layers=2, experts=8)), "mla")
    unit = decode([3, 4, 5])
    graph = CGOPipe().plan(unit, mla, CLUSTER).graph
    assert {n.part for n in graph.nodes if isinstance(n, Attention)} == {"full"}
    graph = FlexGen().plan(unit, SPEC, CLUSTER).graph
    assert {n.part for n in graph.nodes if isinstance(n, Attention)} == {"full"}
    assert not graph.micro_batched


def test_the_gpu_issues_pre_attention_two_steps_ahead():
    unit = decode([7, 9, 11, 13])
    plan = CGOPipe(micro_batches=4).plan(unit, SPEC, CLUSTER)
    graph = plan.graph
    order = dict(plan.rules)
    compute = [graph.nodes[i] for i in order[plan.assignment[0]].order]  # type: ignore[union-attr]
    steps = [(n.layer, n.seqs) for n in compute if isinstance(n, Attention)]
    pres = [(n.layer, n.seqs) for n in compute if isinstance(n, Attention) and n.part == "pre"]
    posts = [(n.layer, n.seqs) for n in compute if isinstance(n, Attention) and n.part == "post"]
    assert steps[:2] == pres[:2]  # the prologue: steps 0 and 1
    k_of = {step: k for k, step in enumerate(posts)}
    # after post of step k, the next pre is step k + 2
    kinds = [(n.part, (n.layer, n.seqs)) for n in compute if isinstance(n, Attention)]
    for (a, sa), (b, sb) in zip(kinds, kinds[1:]):
        if a == "post" and b == "pre":
            assert k_of[sb] == k_of[sa] + 2
    h2d = [graph.nodes[i] for i in order[next(s for s in order if s.name == "h2d")].order]  # type: ignore[union-attr]
    assert [n.payload for n in h2d[:4]] == ["weights"] * 4  # layer 0's pages first
    assert {n.payload for n in h2d} == {"weights", "hidden"}


def simulate(policy, requests):
    """`requests` simulated under `policy` on a GPU sized for 64 KV blocks: (hardware, result)."""
    hw = tight_hardware(SPEC, CLUSTER.placement, 64, 512, 16,
                        reserved=policy.reserved_weights(SPEC, CLUSTER))
    sim = Simulator(SPEC, hw, policy, Routing.parse("uniform", 8, 2, SPEC.num_layers),
                    placement=CLUSTER.placement, max_batch_tokens=512, max_seqs=16)
    return hw, sim.run(requests)


@pytest.mark.parametrize("policy", [CGOPipe(), CGOPipe(micro_batches=2), FlexGen()])
def test_the_simulator_runs_the_four_resources_side_by_side(policy):
    # (and the host's pin stream: its copies into the pinned relay)
    _, result = simulate(policy, [SimRequest(0.0, 24, 6) for _ in range(6)])
    assert len(result.timings) == 6 and not result.memory_violations
    assert invariant_8(None, result) == []
    lanes = {ev.resource for ev in result.trace}
    if isinstance(policy, FlexGen):
        assert lanes == {"cpu:0/compute", "cpu:1/h2d", "cpu:1/pin"}
        return
    assert lanes == {"cpu:0/compute", "cpu:0/d2h", "cpu:1/compute", "cpu:1/h2d", "cpu:1/pin"}
    gpu = [(ev.start, ev.end) for ev in result.trace if ev.resource == "cpu:0/compute"]
    host = [(ev.start, ev.end) for ev in result.trace if ev.resource == "cpu:1/compute"]
    # CPU attention of one micro-batch runs while the GPU computes another's
    assert any(s < e2 and s2 < e for s, e in host for s2, e2 in gpu)


def test_the_gpu_reserves_two_layers_of_the_experts_it_pages_in():
    # and the host two pinned relay slots, each a layer of the experts it sends
    assert CGOPipe().reserved_weights(SPEC, CLUSTER) == {"cpu:0": 2 * 4 * SPEC.expert_params(),
                                                         "cpu:1": 2 * 4 * SPEC.expert_params()}
    alone = Cluster.sharded(("cpu:0",), 8)
    assert CGOPipe().reserved_weights(SPEC, alone) == {}


def test_a_dense_layer_between_moe_layers_keeps_the_double_buffer_by_moe_layer():
    # layers: MoE, MoE, dense, MoE, MoE: layer 3 reuses layer 0's half, layer 4 layer 1's
    spec = spec_from_config(tiny_config("qwen2_moe", TinyShape(layers=5, experts=8),
                                        mlp_only_layers=[2]), "dense in the middle")
    unit = decode([3, 4, 5])
    cut = OffloadCut("cpu:0", "cpu:1", algorithm2(unit, 3, None), pages=2)
    graph, ids = compile_offload(spec, unit, CLUSTER.placement, cut)
    assert problems(graph, spec) == [] and ids.pages[2] == ()
    routed = {layer: {n.id for n in graph.nodes if isinstance(n, Expert)
                      and n.kind == "routed" and n.layer == layer} for layer in (0, 1)}
    for layer, two_back in ((3, 0), (4, 1)):
        for page in ids.pages[layer]:
            war = {e.src for e in graph.edges if e.dst == page and e.kind == "war"}
            assert war == routed[two_back]
    for layer in (0, 1):  # the first pages wait for the GPU to have the unit (and each
        for page in ids.pages[layer]:  # reads its copy in the pinned relay)
            [pin] = graph.inputs(page)
            assert graph.nodes[pin].payload == "pin"
            assert {(e.src, e.kind) for e in graph.edges if e.dst == page} == {
                (ids.embed[0], "control"), (pin, "data")}


def test_each_micro_batch_costs_its_own_shared_expert_in_the_simulator():
    from moeflow.sim.replay import PlanTable

    spec = spec_from_config(tiny_config("qwen2_moe", TinyShape(layers=2, experts=8)), "shared")
    unit = Unit(tuple(SeqChunk(i, 0, n, "cpu:0") for i, n in enumerate([5, 3, 2])))
    plan = CGOPipe(micro_batches=3).plan(unit, spec, CLUSTER)
    table = PlanTable.of(plan, CLUSTER.devices)
    shared = {node.num_tokens for node, _, _ in table.slots
              if isinstance(node, Expert) and node.kind == "shared"}
    assert shared == {5, 3, 2} and table.rebindable


def test_null_workers_run_cgopipe_through_the_whole_runtime():
    from moeflow.actors.inproc import InProcessExecutor
    from moeflow.actors.null import NullWorker
    from moeflow.ops.sampling import SamplingParams
    from moeflow.serve.engine import EngineCore

    executor = InProcessExecutor({d: NullWorker(d, SPEC) for d in CLUSTER.devices})
    core = EngineCore(SPEC, executor, CGOPipe(), CLUSTER)
    requests = [core.add_request([3, 4, 5, 6], SamplingParams(max_new_tokens=4,
                                                                ignore_eos=True))
                for _ in range(5)]
    while core.has_unfinished():
        core.step()
    assert [len(r.output_ids) for r in requests] == [4] * 5
    assert not executor.workers["cpu:1"].kv.seqs  # the host freed every request's KV


def test_a_sliced_page_travels_with_its_columns_and_a_wrong_one_is_refused():
    import torch

    from moeflow.actors.messages import Data, MessageError, decode_all, encode
    from moeflow.actors.values import Page, from_payload, to_payload

    def wire(page: Page) -> Page:  # as the frames arrive: buffers of bytes
        frames = [bytearray(f) for f in encode(Data(1, 2, to_payload(page)))]
        return from_payload(decode_all(frames)[0].payload)  # type: ignore[attr-defined]

    page = Page((4, 5), torch.randn(2, 6, 8), torch.randn(2, 8, 3), columns=(3, 6))
    back = wire(page)
    assert back.columns == (3, 6) and back.experts == (4, 5)
    assert torch.equal(back.gate_up, page.gate_up) and torch.equal(back.down, page.down)
    assert wire(Page((4,), torch.randn(1, 6, 8), torch.randn(1, 8, 3))).columns is None
    for columns in ((3, 5), (-1, 2), (4, 4)):  # 3 columns sent, whatever it says
        bad = Page((4, 5), page.gate_up, page.down, columns=columns)
        with pytest.raises(MessageError, match="inconsistent page"):
            wire(bad)


def test_fresh_prompts_are_prefilled_on_the_gpu_and_only_their_kv_goes_to_the_host():
    """A micro-batch of whole fresh prompts: prefill on the GPU, Transfer(kv) to the host, a
    store there; a micro-batch with a sequence already under way keeps CPU attention."""
    unit = Unit((SeqChunk(0, 0, 12, "cpu:0"), SeqChunk(1, 0, 9, "cpu:0"),
                 SeqChunk(2, 30, 1, "cpu:0"), SeqChunk(3, 8, 4, "cpu:0")))
    cut = OffloadCut("cpu:0", "cpu:1", ((0,), (1,), (2, 3)), pages=3)
    graph, ids = compile_offload(SPEC, unit, CLUSTER.placement, cut)
    assert problems(graph, SPEC) == []
    a = SPEC.attention
    for layer in range(SPEC.num_layers):
        for j, mb in enumerate(cut.micro_batches):
            first, sent, kept = (graph.nodes[i] for i in (ids.pre[layer][j], ids.qkv[layer][j],
                                                          ids.core[layer][j]))
            if mb == (2, 3):  # decode and a later chunk: attention over the host's cache
                assert (first.part, sent.payload, kept.part) == ("pre", "qkv", "core")
                assert ids.back[layer][j] >= 0
                continue
            assert (first.device, first.part) == ("cpu:0", "prefill")
            assert (sent.src, sent.dsts, sent.payload) == ("cpu:0", ("cpu:1",), "kv")
            assert sent.num_bytes == first.num_tokens * 2 * a.kv_width * 4  # fp32 activations
            assert (kept.device, kept.part) == ("cpu:1", "store")
            assert ids.back[layer][j] == -1
            assert graph.roles(ids.post[layer][j][0])["attn"] == (first.id,)  # the Gate
    plan = CGOPipe(micro_batches=3).plan(unit, SPEC, CLUSTER)  # Algorithm 2's micro-batches
    split = algorithm2(unit, 3, None)
    fresh = {i for mb in split if all(unit.seqs[i].start == 0 for i in mb) for i in mb}
    prefills = [n for n in plan.graph.nodes if isinstance(n, Attention) and n.part == "prefill"]
    assert fresh and {i for n in prefills for i in n.seqs} == fresh


def test_a_prefill_whose_keys_reach_no_store_is_caught():
    unit = Unit((SeqChunk(0, 0, 5, "cpu:0"),))
    cut = OffloadCut("cpu:0", "cpu:1", ((0,),), pages=1)
    graph, ids = compile_offload(SPEC, unit, CLUSTER.placement, cut)
    store = ids.core[0][0]
    lost = Graph(graph.unit, graph.placement, graph.nodes,
                 tuple(e for e in graph.edges if e.dst != store), graph.num_layers)
    found = "; ".join(problems(lost, SPEC))
    assert f"Attention#{store}(L0 cpu:1) does not read Attention#{ids.pre[0][0]}" in found
    assert "reads 0 kv input(s), takes 1" in found


def test_prefill_on_the_gpu_is_simulated_with_its_kv_on_the_host_link():
    hw, result = simulate(CGOPipe(micro_batches=2), [SimRequest(0.0, 48, 4) for _ in range(4)])
    assert len(result.timings) == 4 and not result.memory_violations
    assert invariant_8(None, result) == []
    first = result.jobs[0].plan.graph
    sent = [ev for ev in result.trace if ev.job == 0 and isinstance(first.nodes[ev.node], Transfer)
            and first.nodes[ev.node].payload == "kv"]
    assert sent and all(ev.end - ev.start == pytest.approx(hw.host_link.time(
        first.nodes[ev.node].num_bytes)) for ev in sent)  # over the GPU's link to its host
    assert hw.host_link.time(1 << 20) != hw.link.time(1 << 20)

    def what(node):
        return node.payload if isinstance(node, Transfer) else getattr(node, "part", None)

    kinds = {(ev.resource, type(first.nodes[ev.node]).__name__, what(first.nodes[ev.node]))
             for ev in result.trace if ev.job == 0}
    assert ("cpu:0/compute", "Attention", "prefill") in kinds
    assert ("cpu:0/d2h", "Transfer", "kv") in kinds
    assert ("cpu:1/compute", "Attention", "store") in kinds
    assert not any(part in ("pre", "core", "post") for _, kind, part in kinds
                   if kind == "Attention")
