"""DeviceWorker's shortcuts give what the plain path gives: coalesced units (merged decode
batches, one routing sort for many units) equal one unit at a time, and both CPU expert
paths (a loop over active experts, a padded bmm) equal the grouped GEMM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import moeflow.ops.experts as experts_module
from moeflow.actors.inproc import load_worker
from moeflow.actors.values import AttnOut
from moeflow.actors.worker import DeviceWorker
from moeflow.dataflow.graph import Attention, Gate, Placement, SeqChunk, Unit
from moeflow.models.families import load_spec

DEVICE = "cpu:0"


@pytest.fixture(scope="module")
def checkpoint(tiny_factory):
    return tiny_factory("qwen3_moe")


def make_worker(path) -> DeviceWorker:
    spec = load_spec(path)
    placement = Placement.sharded((DEVICE,), spec.moe.num_experts)
    return load_worker(path, spec, placement, DEVICE, torch.float32, 4096)


def attention(worker: DeviceWorker, keys: list[int], hiddens: list[torch.Tensor]
              ) -> list[AttnOut]:
    node = Attention(0, DEVICE, 0, (0,), 1, 1)
    graph = SimpleNamespace(micro_batched=False)  # one chain per device, as compile makes
    return worker.run_group([(k, graph, node, {"hidden": [(None, h)]})
                             for k, h in zip(keys, hiddens)])


def test_coalesced_attention_equals_one_unit_at_a_time(checkpoint):
    """Prefills, then decodes of different lengths (one merged, masked batch), then a
    decode coalesced with a prefill (each unit on its own)."""
    grouped, alone = make_worker(checkpoint), make_worker(checkpoint)
    width = grouped.spec.hidden_size
    torch.manual_seed(0)
    steps = [  # units of one step, as (seq id, start, new tokens)
        [(10, 0, 5), (11, 0, 3)],
        [(10, 5, 1), (11, 3, 1)],
        [(10, 6, 1), (12, 0, 4)],
    ]
    key = 0
    for step in steps:
        keys, hiddens = [], []
        for seq_id, start, num in step:
            key += 1
            unit = Unit((SeqChunk(seq_id, start, num, DEVICE),))
            for w in (grouped, alone):
                w.begin(key, unit, {0: list(range(num))})
            keys.append(key)
            hiddens.append(torch.randn(num, width))
        together = attention(grouped, keys, hiddens)
        apart = [attention(alone, [k], [h])[0] for k, h in zip(keys, hiddens)]
        for a, b in zip(together, apart):
            assert torch.allclose(a.resid, b.resid, atol=1e-5)
            assert torch.allclose(a.xn, b.xn, atol=1e-5)
        for k in keys:
            grouped.end(k)
            alone.end(k)
    assert not grouped._groups  # merged batches are dropped with their units


def test_one_routing_sort_for_many_units_equals_one_each(checkpoint):
    worker = make_worker(checkpoint)
    spec = worker.spec
    num_experts = spec.moe.num_experts
    # owners interleaved: the dispatch order is not the identity
    graph = SimpleNamespace(placement=Placement(("cpu:0", "cpu:1"),
                                                tuple(e % 2 for e in range(num_experts))))
    node = Gate(0, DEVICE, 0, (0,), 1)
    torch.manual_seed(1)
    attns = [AttnOut(torch.randn(n, spec.hidden_size), torch.randn(n, spec.hidden_size))
             for n in (3, 1, 4)]
    together = worker.run_group([(k, graph, node, {"attn": [(None, a)]})
                                 for k, a in enumerate(attns)])
    for k, a in enumerate(attns):
        [alone] = worker.run_group([(k, graph, node, {"attn": [(None, a)]})])
        got = together[k]
        assert torch.equal(got.token_of_row, alone.token_of_row)
        # router logits over more rows may round differently in the last bit
        assert torch.allclose(got.weight_of_row, alone.weight_of_row, atol=1e-6)
        assert torch.equal(got.ends, alone.ends)
        assert (got.offsets, got.counts) == (alone.offsets, alone.counts)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_routing_in_one_kernel_call_equals_torchs_route_and_sort(tiny_factory, monkeypatch,
                                                                 family):
    """The gate's route_dispatch (softmax_topk renormalised or not, topk_softmax) gives what
    router.route and the sort give (the weights within a few fp32 ulps): one unit and
    several, in a dispatch order that is not the identity."""
    from moeflow.ops import cpu as kernels

    worker = make_worker(tiny_factory(family))
    if not worker._cpu_ops:
        pytest.skip("no CPU kernels here")
    spec = worker.spec
    graph = SimpleNamespace(placement=Placement(("cpu:0", "cpu:1"), tuple(
        e % 2 for e in range(spec.moe.num_experts))))
    node = Gate(0, DEVICE, 0, (0,), 1)
    torch.manual_seed(2)
    attns = [AttnOut(torch.randn(n, spec.hidden_size), torch.randn(n, spec.hidden_size))
             for n in (3, 1, 4)]
    calls = []
    real = kernels.route_dispatch
    monkeypatch.setattr(kernels, "route_dispatch", lambda *a: calls.append(1) or real(*a))
    for items in ([(0, graph, node, {"attn": [(None, attns[0])]})],
                  [(k, graph, node, {"attn": [(None, a)]}) for k, a in enumerate(attns)]):
        fused = worker.run_group(items)
        with monkeypatch.context() as m:
            m.setattr(kernels, "ROUTE_MODES", {})
            plain = worker.run_group(items)
        for a, b in zip(fused, plain):
            assert torch.equal(a.token_of_row, b.token_of_row)
            torch.testing.assert_close(a.weight_of_row, b.weight_of_row, rtol=8 * 2.0**-24,
                                       atol=0)
            assert torch.equal(a.ends, b.ends)
            assert (a.offsets, a.counts) == (b.offsets, b.counts)
    assert len(calls) == 2


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("counts", [[[1, 0, 0, 2]], [[0, 3, 0, 1], [2, 0, 0, 1], [0, 0, 0, 4]]])
def test_cpu_expert_paths_equal_the_grouped_gemm(checkpoint, monkeypatch, padded, counts):
    worker = make_worker(checkpoint)
    group = worker._expert_group(0, tuple(range(4)))
    torch.manual_seed(2)
    xs = [torch.randn(sum(c), worker.spec.hidden_size) for c in counts]
    ends = [torch.tensor(c).cumsum(0, dtype=torch.int32) for c in counts]
    monkeypatch.setattr(experts_module, "padded_experts_pay", lambda rows, size: padded)
    got = experts_module.swiglu_batches_cpu(xs, counts, group)
    want = experts_module.swiglu_batches_grouped(xs, ends, group)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kernel", [None, "grouped", "dense"])
@pytest.mark.parametrize("counts", [[[1, 0, 0, 2]], [[0, 3, 0, 1], [2, 0, 0, 1], [0, 0, 0, 4]]])
def test_every_kernel_on_routing_may_pick_gives_the_same_rows(checkpoint, monkeypatch, kernel,
                                                              counts):
    worker = make_worker(checkpoint)
    group = worker._expert_group(0, tuple(range(4)))
    torch.manual_seed(3)
    xs = [torch.randn(sum(c), worker.spec.hidden_size) for c in counts]
    ends = [torch.tensor(c).cumsum(0, dtype=torch.int32) for c in counts]
    want = experts_module.grouped_swiglu_ref(
        *_expert_major_rows(xs, counts), group.gate_up, group.down)
    ran = []
    for name in ("expert_ffn",):  # the fused kernel: "grouped" may take it, "dense" never
        real = getattr(experts_module.kernels, name)
        monkeypatch.setattr(experts_module.kernels, name,
                            lambda *a, real=real, **k: ran.append(name) or real(*a, **k))
    got_cpu = experts_module.swiglu_batches_cpu(xs, counts, group, kernel=kernel)
    got_grouped = experts_module.swiglu_batches_grouped(xs, ends, group, kernel=kernel)
    order = experts_module._expert_major(counts)
    for got in (got_cpu, got_grouped):
        assert torch.allclose(got[order], want, atol=1e-5)
    if kernel == "dense":
        assert not ran
    elif kernel == "grouped" and experts_module.kernels.available():
        assert ran == ["expert_ffn"]  # one call over every expert, whatever the crossover


def _expert_major_rows(xs, counts):
    """The rows of every batch, expert by expert, and the rows per expert."""
    order = experts_module._expert_major(counts)
    return torch.cat(xs)[order], [sum(c) for c in zip(*counts)]
