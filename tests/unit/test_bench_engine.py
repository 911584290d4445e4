"""benchmarks/engine.py's measurement of steady-state decode, on a tiny checkpoint: it runs
the real engine through the workers' run_group as the executor calls it, counts the time
spent there, and stops on a failing step instead of timing it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import engine as bench  # noqa: E402

from moeflow.actors.inproc import InProcessExecutor, load_workers  # noqa: E402
from moeflow.models.families import load_spec  # noqa: E402
from moeflow.models.tiny import TinyShape  # noqa: E402
from moeflow.scheduler.base import Cluster  # noqa: E402
from moeflow.scheduler.registry import make_scheduler  # noqa: E402
from moeflow.serve.engine import EngineCore  # noqa: E402


def tiny_core(path: Path) -> tuple[EngineCore, list[bench._Timed]]:
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    workers = load_workers(path, spec, cluster.placement, torch.float32, 4096)
    timers = [bench._Timed(w) for w in workers.values()]
    core = EngineCore(spec, InProcessExecutor(workers), make_scheduler("batch-ep"), cluster)
    return core, timers


def test_decode_steps_time_the_workers_ops(tiny_factory):
    core, timers = tiny_core(tiny_factory("qwen3_moe", shape=TinyShape(layers=1, experts=4)))
    measured = bench.decode_steps(core, batch=2, steps=3, warmup=1)
    assert len(measured) == 3
    assert all(seconds > 0 and nodes > 0 and inside == 0 for seconds, nodes, inside in measured)
    in_ops = sum(t.seconds for t in timers)
    assert 0 < in_ops  # run_group ran, through the timer, with the kernel argument
    assert not core.requests  # the benchmark's requests are gone when it returns


def test_decode_steps_count_each_steps_time_inside_what_is_watched(tiny_factory):
    """Section 4's split: the seconds inside the watched callables, step by step, within
    the step's own time; the callables are put back afterwards."""
    from moeflow.actors.worker import DeviceWorker

    core, _ = tiny_core(tiny_factory("qwen3_moe", shape=TinyShape(layers=1, experts=4)))
    original = DeviceWorker._lm_head
    inside = bench._Inside([(DeviceWorker, "_lm_head")])
    try:
        measured = bench.decode_steps(core, batch=2, steps=3, warmup=1,
                                      inside=lambda: inside.seconds)
    finally:
        inside.restore()
    assert DeviceWorker._lm_head is original
    assert len(measured) == 3
    assert all(0 < inside_s < seconds for seconds, _, inside_s in measured)


def test_a_failing_step_stops_the_benchmark(tiny_factory):
    core, timers = tiny_core(tiny_factory("qwen3_moe", shape=TinyShape(layers=1, experts=4)))

    def broken(items, kernel=None):
        raise RuntimeError("op failed")

    timers[0].inner = broken
    with pytest.raises(RuntimeError, match="failed: error"):
        bench.decode_steps(core, batch=1, steps=2, warmup=0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_the_simulators_peak_rss_is_its_own_not_this_process(monkeypatch):
    """wait4's ru_maxrss keeps a process's high-water mark across its exec, so a child of a
    big process reported the parent's size; the benchmark reads the child's own VmHWM."""
    ballast = bytearray(600 << 20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # resident: this process is > 600 MB
    monkeypatch.setattr(bench, "SIMULATIONS", (("olmoe-1b-7b", "h100x8", 2, 0.5),))
    [row] = bench.simulator_runs()
    assert row["simulated_s"] > 0 and row["trace_mb"] > 0
    assert 10 < row["peak_rss_mb"] < 500, row
    del ballast
