"""A server runs for days: what the semantics and the actors hold grows with the units in
flight, never with the units run."""

from __future__ import annotations

import pytest
import torch

from moeflow.dataflow import Cut, Placement, SeqChunk, Unit, compile
from moeflow.models.families import spec_from_config
from moeflow.models.tiny import TinyShape, tiny_config
from moeflow.scheduler import Execution, topological_plan
from moeflow.serve.build import build_engine_core
from moeflow.ops.sampling import SamplingParams


def test_execution_holds_only_the_plans_in_flight():
    spec = spec_from_config(tiny_config("qwen3_moe"))
    unit = Unit((SeqChunk(0, 0, 3, "cpu:0"), SeqChunk(1, 0, 2, "cpu:1")))
    plan = topological_plan(compile(spec, unit, Placement.sharded(("cpu:0", "cpu:1"), 8),
                                    Cut()))
    execution = Execution()
    in_flight: list[int] = []
    for _ in range(10_000):
        in_flight.append(execution.add(plan))
        if len(in_flight) == 4:  # four units in flight at a time, the oldest finishing
            index = in_flight.pop(0)
            while not execution.plan_done(index):
                for group in execution.startable():
                    execution.start(group)
                    for task in group:
                        execution.finish(task)
            execution.release(index)
        assert len(execution.plans) <= 4
    assert sum(len(s.heap) + len(s.queue) for s in execution.streams.values()) \
        <= 4 * len(plan.graph.nodes)


@pytest.mark.parametrize("scheduler", ["batch-ep", "fine-ep", "eps"])
def test_actor_cores_hold_nothing_once_their_requests_end(tiny_factory, scheduler):
    path = tiny_factory("qwen3_moe", shape=TinyShape(layers=1, experts=4))
    core = build_engine_core(path, devices="cpu:0,cpu:1", scheduler=scheduler)
    if scheduler == "eps":  # its kernel choice, by the local CPU kernels' crossover
        from moeflow.ops.cpu.choice import ALL_ROWS, kernel_choice
        from moeflow.scheduler.eps import cpu_kernel_band

        crossover = kernel_choice().expert_limit(torch.float32)
        assert core.scheduler.kernel_band == (  # no choice: no kernels, or they always win
            cpu_kernel_band(crossover) if 0 < crossover < ALL_ROWS else None)
    actors = core.executor.actors.values()
    num_tokens = 0
    for round_ in range(40):
        for i in range(4):
            core.add_request([3 + i, 9, 27], SamplingParams(max_new_tokens=8,
                                                            temperature=0.7, seed=round_))
        while core.has_unfinished():
            num_tokens += len(core.step())
        for rid in [r for r, req in core.requests.items() if req.finished]:
            core.pop_finished(rid)
        for actor in actors:
            held = (len(actor.execution.plans), len(actor.units), len(actor.by_index),
                    len(actor.early), len(actor.samplers))
            assert held == (0, 0, 0, 0, 0), (actor.name, held)
            assert not actor.worker.kv.seqs and not actor.worker._units
    assert num_tokens >= 40 * 8
    assert not core.requests and not core.book.seqs
    if scheduler == "eps":  # one kernel remembered per layer and expert group, no more
        remembered = len(core.scheduler._last)
        assert (0 < remembered <= 1 * 4) if core.scheduler.kernel_band else remembered == 0


def test_cached_plans_are_dropped_everywhere_once_evicted(tiny_factory):
    """A plan cache of 2 over many unit shapes: evicted plans are dropped on the actor
    processes too, and the tokens equal those of a roomy cache."""
    from moeflow.scheduler.registry import make_scheduler
    from moeflow.serve.build import make_executor
    from moeflow.serve.engine import EngineCore

    path = tiny_factory("qwen3_moe", shape=TinyShape(layers=1, experts=4))
    reference = build_engine_core(path, devices="cpu:0,cpu:1")
    spec, cluster = reference.spec, reference.cluster
    executor = make_executor("zmq", path, spec, cluster, torch.float32, 4096)
    # fine-ep: a plan per (home, logits, phase), four shapes here; batch-ep's depend on
    # the homes alone
    core = EngineCore(spec, executor, make_scheduler("fine-ep"), cluster, num_cached_plans=2)
    inproc = EngineCore(spec, make_executor("inproc", path, spec, cluster, torch.float32, 4096),
                        make_scheduler("fine-ep"), cluster, num_cached_plans=2)
    try:
        outputs = []
        for engine in (reference, core, inproc):
            # staggered lengths: prefills and decodes on both homes
            reqs = [engine.add_request([3 + i, 9, 27], SamplingParams(max_new_tokens=2 + i,
                                                                      ignore_eos=True))
                    for i in range(5)]
            while engine.has_unfinished():
                engine.step()
            outputs.append([tuple(r.output_ids) for r in reqs])
        assert outputs[0] == outputs[1] == outputs[2]
        assert core.plans.num_compiled > 2 and len(core.plans) == 2
        for held in executor.coordinator.plans.values():
            assert len(held) <= 2
        for actor in inproc.executor.actors.values():  # the actor cores' own caches
            assert len(actor.plans) <= 2
    finally:
        executor.close()


def test_the_conformance_suite_removes_its_checkpoints_when_the_process_exits(tmp_path):
    import os
    import subprocess
    import sys

    code = ("from moeflow.testing.conformance import _tiny_checkpoint; "
            "print(_tiny_checkpoint('qwen3_moe', 1, 4, 2))")
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the checkpoint goes under tmp_path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    made = out.stdout.strip()
    assert made.startswith(str(tmp_path))  # it was built there
    assert list(tmp_path.iterdir()) == []  # and removed at exit
