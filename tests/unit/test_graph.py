"""The graph compiler's structure, without weights."""

from __future__ import annotations

import pytest

from moeflow.dataflow import (
    Attention, Combine, Cut, Edge, Embed, Expert, Gate, Graph, GraphError, LMHead, Placement,
    SeqChunk, Transfer, Unit, compile, split_groups,
)
from moeflow.dataflow import graph as graph_module
from moeflow.dataflow.graph import dispatch_groups
from moeflow.models.families import spec_from_config
from moeflow.models.tiny import tiny_config


def spec(family="qwen3_moe", **overrides):
    return spec_from_config(tiny_config(family, **overrides))


def unit(*homes, tokens=4):
    return Unit(tuple(SeqChunk(i, 0, tokens, h) for i, h in enumerate(homes)))


def test_single_device_layer_is_attention_gate_expert_combine():
    s = spec()
    g = compile(s, unit("cpu:0"), Placement.sharded(("cpu:0",), 8))
    kinds = [type(n).__name__ for n in g.layer_nodes(0)]
    assert kinds == ["Attention", "Gate", "Expert", "Combine"]
    assert not g.of_kind(Transfer)
    assert len(g.of_kind(Embed)) == len(g.of_kind(LMHead)) == 1


def test_sharded_experts_add_dispatch_and_combine_transfers():
    s = spec()
    devices = ("cpu:0", "cpu:1", "cpu:2", "cpu:3")
    g = compile(s, unit("cpu:0"), Placement.sharded(devices, 8))
    layer0 = g.layer_nodes(0)
    experts = [n for n in layer0 if isinstance(n, Expert)]
    assert [e.experts for e in experts] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    transfers = [n for n in layer0 if isinstance(n, Transfer)]
    # the home's dispatch goes to every other owner at once; each owner's combine comes back
    assert sorted((t.payload, t.src, t.dsts, t.experts) for t in transfers) == sorted(
        [("dispatch", "cpu:0", devices[1:], (2, 3, 4, 5, 6, 7))]
        + [("combine", d, ("cpu:0",), e.experts) for d, e in zip(devices[1:], experts[1:])])
    [dispatch] = [t for t in transfers if t.payload == "dispatch"]
    assert dispatch_groups(dispatch, g.placement) == ((2, 3), (4, 5), (6, 7))
    assert all(t.num_bytes is None for t in transfers)  # sized by the gate at run time
    with pytest.raises(GraphError, match="goes to 3 devices"):
        dispatch.dst  # noqa: B018


def test_two_homes_exchange_with_one_transfer_per_device_and_layer():
    devices = ("cpu:0", "cpu:1", "cpu:2")
    g = compile(spec(), unit("cpu:0", "cpu:1", "cpu:2"), Placement.sharded(devices, 8))
    transfers = [n for n in g.layer_nodes(0) if isinstance(n, Transfer)]
    # each home dispatches once to the two other owners; each owner combines once back
    assert sorted((t.payload, t.src, t.dsts) for t in transfers) == sorted(
        [("dispatch", d, tuple(o for o in devices if o != d)) for d in devices]
        + [("combine", d, tuple(o for o in devices if o != d)) for d in devices])
    with pytest.raises(GraphError, match="goes to one device"):
        Transfer(0, "cpu:0", ("cpu:1", "cpu:2"), 0, "qkv")
    with pytest.raises(GraphError, match="goes to one device"):
        Transfer(0, "cpu:0", ("cpu:0", "cpu:2"), 0, "dispatch")


def test_two_homes_share_each_owners_expert_node():
    g = compile(spec(), unit("cpu:0", "cpu:1"), Placement.sharded(("cpu:0", "cpu:1"), 8))
    for e in g.of_kind(Expert):
        homes = {g.nodes[p].device for p in g.inputs(e.id)}
        assert homes == {"cpu:0", "cpu:1"}  # rows from both homes, one GEMM


def test_dense_and_shared_layers():
    s = spec("deepseek_v2")  # first layer dense, shared experts after
    g = compile(s, unit("cpu:0"), Placement.sharded(("cpu:0",), 8))
    assert [e.kind for e in g.of_kind(Expert) if e.layer == 0] == ["dense"]
    assert sorted(e.kind for e in g.of_kind(Expert) if e.layer == 1) == ["routed", "shared"]
    assert not [n for n in g.layer_nodes(0) if isinstance(n, Gate)]


def test_expert_stages_split_each_owner_into_contiguous_groups():
    g = compile(spec(), unit("cpu:0"), Placement.sharded(("cpu:0", "cpu:1"), 8),
                Cut(expert_stages=2))
    groups = [(e.device, e.stage, e.experts) for e in g.of_kind(Expert) if e.layer == 0]
    assert groups == [("cpu:0", 0, (0, 1)), ("cpu:1", 0, (4, 5)),  # stage by stage
                      ("cpu:0", 1, (2, 3)), ("cpu:1", 1, (6, 7))]
    dispatches = [(t.stage, t.dsts, t.experts) for t in g.of_kind(Transfer)
                  if t.layer == 0 and t.payload == "dispatch"]
    assert dispatches == [(0, ("cpu:1",), (4, 5)), (1, ("cpu:1",), (6, 7))]
    assert split_groups((0, 1, 2), 5) == [(0,), (1,), (2,)]


def test_barrier_orders_every_home_after_every_combine():
    g = compile(spec(), unit("cpu:0", "cpu:1"), Placement.sharded(("cpu:0", "cpu:1"), 8),
                Cut(barrier=True))
    combines = [n.id for n in g.of_kind(Combine) if n.layer == 0]
    for attn in (n for n in g.of_kind(Attention) if n.layer == 1):
        assert set(combines) <= set(g.preds(attn.id))
    assert any(e.kind == "control" for e in g.edges)


def test_graph_repr_is_valid_python():
    g = compile(spec(), unit("cpu:0", "cpu:1"), Placement.sharded(("cpu:0", "cpu:1"), 8))
    names = {n: getattr(graph_module, n) for n in graph_module.__dict__ if n[0].isupper()}
    again = eval(repr(g), names)
    assert again == g


def test_cycles_and_bad_edges_raise():
    u = unit("cpu:0")
    p = Placement.sharded(("cpu:0",), 8)
    nodes = (Embed(0, "cpu:0", (0,), 4), Attention(1, "cpu:0", 0, (0,), 4, 4))
    with pytest.raises(GraphError, match="cycle"):
        Graph(u, p, nodes, (Edge(0, 1), Edge(1, 0)))
    with pytest.raises(GraphError, match="bad edge"):
        Graph(u, p, nodes, (Edge(0, 7),))
    with pytest.raises(GraphError, match="has id"):
        Graph(u, p, (nodes[1],), ())


def test_units_and_placements_validate():
    with pytest.raises(GraphError, match="twice"):
        Unit((SeqChunk(1, 0, 2, "cpu:0"), SeqChunk(1, 2, 1, "cpu:0")))
    with pytest.raises(GraphError, match="num_tokens"):
        SeqChunk(0, 0, 0, "cpu:0")
    with pytest.raises(GraphError, match="unknown devices"):
        compile(spec(), unit("cpu:9"), Placement.sharded(("cpu:0",), 8))
    with pytest.raises(GraphError, match="covers 4 experts"):
        compile(spec(), unit("cpu:0"), Placement.sharded(("cpu:0",), 4))
    assert Placement.sharded(("a", "b", "c"), 8).expert_owners == (0, 0, 0, 1, 1, 1, 2, 2)
