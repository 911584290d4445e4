"""Each node kind is declared in one place (moeflow.dataflow.kinds): every kind is there, what
each declaration names exists where it runs, and each payload's codec is known."""

from __future__ import annotations

import typing

import pytest

from moeflow.actors.null import NullWorker
from moeflow.actors.values import TRAVELS, Page, Partial, Rows
from moeflow.actors.worker import DeviceWorker
from moeflow.dataflow import graph
from moeflow.dataflow.kinds import KINDS
from moeflow.sim import hardware, models
from moeflow.sim.cost import KERNELS, CostModel


def test_every_kind_is_declared_and_what_it_names_exists():
    assert set(KINDS) == set(graph.NODE_KINDS)
    for cls, kind in KINDS.items():
        assert kind.node is cls
        assert callable(getattr(DeviceWorker, kind.op)), (cls, kind.op)
        assert callable(getattr(CostModel, kind.cost)), (cls, kind.cost)
        assert KERNELS[cls] == kind.launches >= 1


def test_every_payload_travels_in_a_known_codec():
    payloads = set(typing.get_args(graph.Payload))
    travels = KINDS[graph.Transfer].travels
    assert set(travels) == payloads
    assert set(travels.values()) <= {"tensor", *TRAVELS}
    # the values the worker hands on for them are those codecs'
    assert (Rows.KIND, Partial.KIND, Page.KIND) == (travels["dispatch"], travels["combine"],
                                                    travels["weights"])
    assert all(kind.travels == {} for cls, kind in KINDS.items() if cls is not graph.Transfer)
    # the null worker hands on values of those codecs too (the actors hold it to them)
    null = NullWorker("cpu:0", models.load("mixtral-8x7b"), kv_tokens=16)
    for payload, codec in travels.items():
        node = graph.Transfer(0, "cpu:0", ("cpu:1",), 0, payload, experts=(0, 1))
        value = null._value(None, None, node)  # type: ignore[arg-type]
        for part in value if payload in graph.FAN_PAYLOADS else (value,):
            assert getattr(part, "KIND", "tensor") == codec, payload


def test_sizes_bind_and_memory_come_from_the_kind():
    """A compiled graph's nodes bound to their own unit come back unchanged (what a replayed
    plan relies on), and each kind's memory effect is what its value holds."""
    from moeflow.dataflow import Cut, Placement, SeqChunk, Unit, compile
    from moeflow.sim.replay import bind, output_bytes

    spec = models.load("mixtral-8x7b")
    placement = Placement.sharded(("cuda:0", "cuda:1"), spec.moe.num_experts)
    unit = Unit((SeqChunk(0, 0, 7, "cuda:0"), SeqChunk(1, 5, 1, "cuda:1")))
    g = compile(spec, unit, placement, Cut())
    for node in g.nodes:
        seqs = getattr(node, "seqs", ())
        if isinstance(node, graph.Expert) and node.kind != "routed":
            seqs = unit.seqs_on(node.device)
        assert bind(node, unit, seqs) == node
        held = output_bytes(spec, 2, node)
        if isinstance(node, graph.LMHead):
            assert held == node.num_rows * spec.vocab_size * 4
        elif isinstance(node, graph.Gate):
            assert held == (1 + spec.moe.top_k) * node.num_tokens * spec.hidden_size * 2
    # a kind's cost is the method it names
    cost = CostModel(spec, hardware.load("h100x8"))
    gate = next(n for n in g.nodes if isinstance(n, graph.Gate))
    assert cost.bare_cost(g, gate) == cost._gate_cost(g, gate, (), None, None)
    with pytest.raises(TypeError, match="no cost for"):
        cost.bare_cost(g, object())  # type: ignore[arg-type]


def test_a_transfer_handing_on_another_codec_than_its_kind_declares_fails_its_unit(
        tiny_factory, monkeypatch):
    """The codec a payload is declared to travel in is held to: a dispatch whose value is a
    bare tensor fails its request with the reason, and the engine goes on."""
    import torch

    from moeflow.ops.sampling import SamplingParams
    from moeflow.serve.build import build_engine_core

    core = build_engine_core(tiny_factory("qwen3_moe"), devices="cpu:0,cpu:1")
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)

    def finish(request):  # type: ignore[no-untyped-def]
        while core.has_unfinished():
            core.step()
        return request.finish_reason

    real = DeviceWorker._transfer

    def wrong(self, graph, node, inputs):  # type: ignore[no-untyped-def]
        value = real(self, graph, node, inputs)
        return tuple(torch.zeros(1) for _ in value) if node.payload == "dispatch" else value

    monkeypatch.setattr(DeviceWorker, "_transfer", wrong)
    reason = finish(core.add_request([5, 6, 7], params))
    assert reason is not None and "made a tensor value; its payload travels as rows" in reason
    monkeypatch.setattr(DeviceWorker, "_transfer", real)
    assert finish(core.add_request([5, 6, 7], params)) == "length"
    core.executor.close()
