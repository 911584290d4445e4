"""Plans compiled once per unit shape and replayed with the unit bound per step."""

from __future__ import annotations

import pytest

from moeflow.dataflow import SeqChunk, Unit
from moeflow.models.families import spec_from_config
from moeflow.models.tiny import tiny_config
from moeflow.scheduler import BatchEP, Cluster, FineEP
from moeflow.scheduler.base import Scheduler, unit_shape
from moeflow.scheduler.plan_cache import PlanCache

SPEC = spec_from_config(tiny_config("qwen3_moe"))
CLUSTER = Cluster.sharded(("cpu:0", "cpu:1"), SPEC.moe.num_experts)


def decode(*homes: str, start: int = 5) -> Unit:
    return Unit(tuple(SeqChunk(i + start, start + i, 1, h) for i, h in enumerate(homes)))


@pytest.mark.parametrize("scheduler", [BatchEP(), FineEP()])
def test_units_of_one_shape_share_a_plan_and_others_do_not(scheduler):
    cache = PlanCache()
    a = decode("cpu:0") if isinstance(scheduler, FineEP) else decode("cpu:0", "cpu:1")
    b = decode("cpu:0", start=40) if isinstance(scheduler, FineEP) else \
        decode("cpu:0", "cpu:1", start=40)
    other = decode("cpu:1") if isinstance(scheduler, FineEP) else decode("cpu:1", "cpu:1")
    id_a, plan_a = cache.plan(scheduler, a, SPEC, CLUSTER)
    id_b, plan_b = cache.plan(scheduler, b, SPEC, CLUSTER)
    id_o, _ = cache.plan(scheduler, other, SPEC, CLUSTER)
    assert id_a == id_b is not None and plan_a is plan_b and plan_a.graph.unit == a
    assert id_o != id_a
    assert (cache.num_hits, cache.num_compiled) == (1, 2)
    prefill = Unit((SeqChunk(9, 0, 7, a.seqs[0].home),) + a.seqs[1:])
    more = Unit(a.seqs + (SeqChunk(99, 3, 1, a.seqs[0].home),))
    if isinstance(scheduler, FineEP):  # a prefill chunk is another shape than a decode step
        assert cache.plan(scheduler, prefill, SPEC, CLUSTER)[0] not in (id_a, id_o)
    else:  # batch-ep's graph depends only on its homes: sequences are bound per step
        assert cache.plan(scheduler, prefill, SPEC, CLUSTER)[0] == id_a
        assert cache.plan(scheduler, more, SPEC, CLUSTER)[0] == id_a


def test_the_least_recently_used_plan_is_evicted_and_its_id_never_reused():
    cache = PlanCache(capacity=2)
    scheduler = BatchEP()
    ids = [cache.plan(scheduler, decode(*homes), SPEC, CLUSTER)[0]
           for homes in (("cpu:0",), ("cpu:1",), ("cpu:0",), ("cpu:0", "cpu:1"))]
    assert ids[0] == ids[2] and len(set(ids)) == 3
    assert cache.take_evicted() == [ids[1]] and cache.take_evicted() == []
    assert len(cache) == 2
    again = cache.plan(scheduler, decode("cpu:1"), SPEC, CLUSTER)[0]
    assert again not in ids


def test_a_plugin_without_a_key_is_planned_every_time():
    class Plugin(BatchEP):
        name = "plugin"
        plan_key = Scheduler.plan_key  # the contract's default: no sharing

    cache = PlanCache()
    unit = decode("cpu:0")
    first, second = (cache.plan(Plugin(), unit, SPEC, CLUSTER) for _ in range(2))
    assert first[0] is None and second[0] is None and first[1] is not second[1]
    assert len(cache) == 0


def test_unit_shape_names_home_logits_and_phase():
    unit = Unit((SeqChunk(1, 0, 4, "cpu:0"), SeqChunk(2, 9, 1, "cpu:1", "none")))
    assert unit_shape(unit) == (("cpu:0", "last", "prefill"), ("cpu:1", "none", "decode"))
