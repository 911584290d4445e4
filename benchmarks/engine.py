"""The graph engine's own cost, measured side by side in one run.

1. Runtime per node with null ops: the engine (EngineCore, the executor, the actor cores
   and the one semantics) over NullWorkers, which run every node instantly. A step's wall
   time (scheduling and planning, running, completing) over the nodes it ran is what the
   runtime costs per node. Batch 1 and 16, batch-ep and fine-ep, on `make demo`'s model
   shape (4 layers, 16 experts, top-4) over two devices, in process and with one actor
   process per device. Goal: <= 10 us per node in process.
2. Steady-state greedy decode on `make demo`'s checkpoint with real ops: tokens/s at batch 1
   and 16 (from the median step), and the share of step time spent inside the workers' ops
   (the rest is the runtime). Goal: >= 80 % in ops.
3. The simulator: `moeflow simulate` with batch-ep, poisson:rate=20 arrivals and a Chrome
   trace written as it runs, in a subprocess of its own: simulated seconds (the run's
   makespan) per wall second of the whole command, and the command's peak RSS. Mixtral
   8x7B on 8 H100 with 200 requests, DeepSeek-V2 on 8 H200 with 60. Goals: >= 1.0 and
   >= 0.5 simulated s per wall s, <= 1 GB.
4. Between the kernels: greedy decode on `benchmarks/foundation.py`'s checkpoint (12 layers,
   64 experts, hidden 1024) on cpu:0, batch 1 and 16: the median step, the time inside its
   big kernels (the routed experts' FFN, the fused decode attention, the LM head node), and
   the rest (the gates' routing, the combines, the runtime, every small op between them).

    python benchmarks/engine.py [--json out.json] [--steps 64]
                                [--only runtime,decode,between,sim]

Medians over the steps measured, after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moeflow.actors.coordinator import ZmqExecutor
from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.actors.null import NullWorker
from moeflow.models.families import load_spec
from moeflow.models.tiny import TinyShape, make_tiny
from moeflow.scheduler.base import Cluster
from moeflow.scheduler.registry import make_scheduler
from moeflow.serve.engine import EngineCore
from moeflow.ops.sampling import SamplingParams

DEMO = Path(".cache/tiny-qwen3-moe")
DEMO_SHAPE = TinyShape(layers=4, experts=16, top_k=4, hidden=256, heads=8, kv_heads=2,
                       head_dim=32, intermediate=256, vocab=2048)
DEVICES = ("cpu:0", "cpu:1")
SCHEDULERS = ("batch-ep", "fine-ep")
BATCHES = (1, 16)
EXECUTORS = ("in-process", "2 processes")


def demo_checkpoint() -> Path:
    if not (DEMO / "config.json").exists():
        print(f"building {DEMO} ...", file=sys.stderr)
        make_tiny("qwen3_moe", DEMO, DEMO_SHAPE, dtype="bfloat16", seed=0)
    return DEMO


class _Timed:
    """Wraps a worker's run_group, summing the seconds spent in it."""

    def __init__(self, worker: Any) -> None:
        self.worker, self.seconds = worker, 0.0
        self.inner = worker.run_group
        worker.run_group = self

    def __call__(self, items: list[Any], kernel: str | None = None) -> list[Any]:
        start = time.perf_counter()
        try:
            return self.inner(items, kernel)  # type: ignore[no-any-return]
        finally:
            self.seconds += time.perf_counter() - start


def decode_steps(core: EngineCore, batch: int, steps: int, warmup: int = 8,
                 inside: Callable[[], float] | None = None) -> list[tuple[float, int, float]]:
    """(seconds, nodes run, seconds `inside` counted) of each steady-state decode step of
    `batch` requests; `inside` returns a running total of seconds (0 without one)."""
    params = SamplingParams(max_new_tokens=steps + warmup + 1, ignore_eos=True)
    for i in range(batch):
        core.add_request([3 + i, 4, 5, 6], params)
    while any(not r.output_ids and not r.finished for r in core.requests.values()):
        core.step()  # prefill
    failed = [r.finish_reason for r in core.requests.values()
              if (r.finish_reason or "").startswith("error")]
    if failed:  # a benchmark of failing steps would measure nothing
        raise RuntimeError(f"prefill failed: {failed[0]}")
    out = []
    for n in range(steps + warmup):
        counted = inside() if inside is not None else 0.0
        start = time.perf_counter()  # the whole step: schedule and plan, run, complete
        jobs = core.schedule()
        if not jobs:
            break
        results = core.executor.run_many([core.job_spec(job) for job in jobs])
        for job, result in zip(jobs, results):
            core.complete(job, result)
        elapsed = time.perf_counter() - start
        counted = (inside() if inside is not None else 0.0) - counted
        failed = [r.finish_reason for r in core.requests.values()
                  if (r.finish_reason or "").startswith("error")]
        if failed:
            raise RuntimeError(f"decode failed: {failed[0]}")
        if n >= warmup:
            out.append((elapsed, sum(len(j.plan.graph.nodes) for j in jobs), counted))
    for rid in list(core.requests):
        core.abort(rid)
        core.pop_finished(rid)
    return out


def engine(spec: Any, scheduler: str, workers: dict[str, Any]) -> EngineCore:
    cluster = Cluster.sharded(DEVICES, spec.moe.num_experts)
    return EngineCore(spec, InProcessExecutor(workers), make_scheduler(scheduler), cluster)


def null_ops(checkpoint: Path, steps: int) -> list[dict[str, Any]]:
    """Both executors over NullWorkers: in this process, and one actor process per device
    (the zmq transport, with its sockets, codec and CURVE)."""
    spec = load_spec(checkpoint)
    cluster = Cluster.sharded(DEVICES, spec.moe.num_experts)
    rows = []
    for executor in EXECUTORS:
        for scheduler in SCHEDULERS:
            for batch in BATCHES:
                if executor == "in-process":
                    run = InProcessExecutor({d: NullWorker(d, spec) for d in DEVICES})
                else:
                    run = ZmqExecutor(str(checkpoint), cluster.placement, "bfloat16", 65536,
                                      threads=len(DEVICES), null_ops=True)
                try:
                    core = EngineCore(spec, run, make_scheduler(scheduler), cluster)
                    measured = decode_steps(core, batch, steps)
                finally:
                    run.close()
                per_node = statistics.median(s / n for s, n, _ in measured)
                rows.append({"scheduler": scheduler, "batch": batch, "executor": executor,
                             "nodes_per_step": statistics.median(n for _, n, _ in measured),
                             "us_per_node": per_node * 1e6})
    return rows


def real_ops(checkpoint: Path, steps: int) -> list[dict[str, Any]]:
    spec = load_spec(checkpoint)
    cluster = Cluster.sharded(DEVICES, spec.moe.num_experts)
    rows = []
    for scheduler in SCHEDULERS:
        for batch in BATCHES:
            workers = load_workers(checkpoint, spec, cluster.placement, torch.bfloat16, 65536)
            timers = [_Timed(w) for w in workers.values()]
            core = engine(spec, scheduler, workers)
            decode_steps(core, batch, 4)  # warm every shape up
            for t in timers:
                t.seconds = 0.0
            measured = decode_steps(core, batch, steps, warmup=0)
            wall = sum(s for s, _, _ in measured)
            step = statistics.median(s for s, _, _ in measured)
            rows.append({"scheduler": scheduler, "batch": batch,
                         "tok_s": batch / step,  # the median step: robust to a busy moment
                         "ms_per_step": step * 1e3,
                         "nodes_per_step": statistics.median(n for _, n, _ in measured),
                         "share_in_ops": sum(t.seconds for t in timers) / wall})
    return rows


class _Inside:
    """Sums the seconds spent in some callables (module functions or methods), replacing
    them on their owners until `restore`."""

    def __init__(self, targets: list[tuple[Any, str]]) -> None:
        self.seconds = 0.0
        self.originals = [(owner, name, getattr(owner, name)) for owner, name in targets]
        for owner, name, original in self.originals:
            setattr(owner, name, self._timed(original))

    def _timed(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    def restore(self) -> None:
        for owner, name, original in self.originals:
            setattr(owner, name, original)


def between_kernels(steps: int) -> list[dict[str, Any]]:
    """Section 4: each step's time in the big kernels and outside them."""
    from foundation import CHECKPOINT, ensure_checkpoint  # type: ignore[import-not-found]

    from moeflow.actors.worker import DeviceWorker
    from moeflow.ops import cpu as kernels

    ensure_checkpoint(CHECKPOINT)
    spec = load_spec(CHECKPOINT)
    cluster = Cluster.sharded(("cpu:0",), spec.moe.num_experts)
    workers = load_workers(CHECKPOINT, spec, cluster.placement, torch.bfloat16, 65536)
    core = EngineCore(spec, InProcessExecutor(workers), make_scheduler("batch-ep"), cluster)
    rows = []
    for batch in BATCHES:
        decode_steps(core, batch, 4)  # warm every shape up
        inside = _Inside([(kernels, "expert_ffn"), (kernels, "attention_decode"),
                          (DeviceWorker, "_lm_head")])
        try:
            measured = decode_steps(core, batch, steps, inside=lambda: inside.seconds)
        finally:
            inside.restore()
        step = statistics.median(s for s, _, _ in measured)
        outside = statistics.median(s - k for s, _, k in measured)
        rows.append({"batch": batch, "ms_per_step": step * 1e3,
                     "ms_in_big_kernels": statistics.median(k for _, _, k in measured) * 1e3,
                     "ms_outside": outside * 1e3})
    return rows


SIMULATIONS = (  # model, hardware, requests, goal in simulated s per wall s
    ("mixtral-8x7b", "h100x8", 200, 1.0),
    ("deepseek-v2", "h200x8", 60, 0.5),
)
SIM_RSS_GOAL_MB = 1000.0
SECTIONS = ("runtime", "decode", "between", "sim")


# `python -m moeflow ARGS...` that writes its peak RSS (VmHWM, KiB) to a file at exit, and
# the largest of the children it waited for (the Chrome trace's line writer): their sum
# bounds the pair's. wait4's ru_maxrss will not do for the command itself: it keeps the
# high-water mark of the process across its exec, and the child starts as a copy of this
# process, which the sections before may have grown to GBs (a 1.5 GB parent: ru_maxrss
# 1,511 MB for a child whose VmHWM was 11 MB)
PEAK_RSS = """
import atexit, resource, runpy, sys
out = sys.argv.pop(1)
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            open(out, "w").write(f"{line.split()[1]} {children}")
atexit.register(peak)
runpy.run_module("moeflow", run_name="__main__", alter_sys=True)
"""


def simulator_runs() -> list[dict[str, Any]]:
    """Each setting of SIMULATIONS as one `moeflow simulate --trace` command, measured from
    outside: wall time of the command, and its peak RSS (its own VmHWM plus its largest
    child's, where /proc has it; else what wait4 reports, which may include this
    process's)."""
    rows = []
    for model, hardware, num_requests, goal in SIMULATIONS:
        with tempfile.TemporaryDirectory() as tmp:
            trace, metrics = Path(tmp) / "out.json", Path(tmp) / "metrics.json"
            peak = Path(tmp) / "peak"
            launch = ([sys.executable, "-c", PEAK_RSS, str(peak)]
                      if Path("/proc/self/status").exists() else [sys.executable, "-m", "moeflow"])
            command = [*launch, "simulate", "--model", model,
                       "--hardware", hardware, "--scheduler", "batch-ep",
                       "--workload", "poisson:rate=20", "--num-requests", str(num_requests),
                       "--trace", str(trace), "--json", str(metrics)]
            start = time.perf_counter()
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - start
            if child.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} exited with {child.returncode}")
            makespan = json.loads(metrics.read_text())["metrics"]["makespan"]
            rss_mb = (sum(map(int, peak.read_text().split())) if peak.exists()
                      else usage.ru_maxrss) / 1024  # KiB
            rows.append({"model": model, "hardware": hardware, "requests": num_requests,
                         "simulated_s": makespan, "wall_s": wall,
                         "sim_s_per_wall_s": makespan / wall, "goal": goal,
                         "peak_rss_mb": rss_mb, "trace_mb": trace.stat().st_size / 1e6})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    from moeflow.cli import check_output

    check_output(parser, args.json, "--json")  # before minutes of measuring
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    only = set(args.only.split(","))
    if not only <= set(SECTIONS):
        parser.error(f"--only takes {', '.join(SECTIONS)}, not {args.only}")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    nulls: list[dict[str, Any]] = []
    reals: list[dict[str, Any]] = []
    betweens: list[dict[str, Any]] = []
    sims: list[dict[str, Any]] = []
    if only & {"runtime", "decode"}:
        checkpoint = demo_checkpoint()
    if "runtime" in only:
        print("null ops ...", file=sys.stderr)
        nulls = null_ops(checkpoint, args.steps)
    if "decode" in only:
        print("real ops ...", file=sys.stderr)
        reals = real_ops(checkpoint, args.steps)
    if "between" in only:
        print("between the kernels ...", file=sys.stderr)
        betweens = between_kernels(args.steps)
    if "sim" in only:
        print("the simulator ...", file=sys.stderr)
        sims = simulator_runs()
    if nulls:
        print(f"\n1. runtime per node, null ops, {'+'.join(DEVICES)} (goal <= 10 us in process)")
        print("| scheduler | batch | executor | nodes/step | us/node |")
        print("|---|---:|---|---:|---:|")
        for r in nulls:
            print(f"| {r['scheduler']} | {r['batch']} | {r['executor']} | "
                  f"{r['nodes_per_step']:.0f} | {r['us_per_node']:.1f} |")
    if reals:
        print(f"\n2. steady-state greedy decode, {checkpoint} (goal >= 80 % of step time in ops)")
        print("| scheduler | batch | tok/s | ms/step | nodes/step | in ops |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in reals:
            print(f"| {r['scheduler']} | {r['batch']} | {r['tok_s']:.0f} | "
                  f"{r['ms_per_step']:.2f} | {r['nodes_per_step']:.0f} | "
                  f"{r['share_in_ops']:.0%} |")
    if sims:
        print(f"\n3. the simulator, batch-ep, poisson:rate=20, --trace out.json "
              f"(goal: sim-s/wall-s as listed, peak RSS <= {SIM_RSS_GOAL_MB:.0f} MB)")
        print("| model | hardware | requests | simulated s | wall s | sim-s/wall-s | goal | "
              "peak RSS MB | trace MB |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in sims:
            print(f"| {r['model']} | {r['hardware']} | {r['requests']} | "
                  f"{r['simulated_s']:.2f} | {r['wall_s']:.1f} | {r['sim_s_per_wall_s']:.2f} | "
                  f">= {r['goal']} | {r['peak_rss_mb']:.0f} | {r['trace_mb']:.0f} |")
    if betweens:
        print("\n4. between the kernels: greedy decode, benchmarks/foundation.py's checkpoint, "
              "cpu:0, batch-ep (median steps)")
        print("| batch | ms/step | in the big kernels | outside them |")
        print("|---:|---:|---:|---:|")
        for r in betweens:
            print(f"| {r['batch']} | {r['ms_per_step']:.2f} | {r['ms_in_big_kernels']:.2f} | "
                  f"{r['ms_outside']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"null_ops": nulls, "real_ops": reals,
                                         "between_kernels": betweens, "simulator": sims},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
