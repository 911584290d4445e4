"""check_scheduler: the invariant suite any scheduling policy must pass.

    from moeflow.testing import check_scheduler
    check_scheduler(MyScheduler)            # raises ConformanceError on a violation

It draws small models, clusters, routings and workloads with Hypothesis, runs the policy in
the simulator (and, for the results check, for real in process), and checks DESIGN's
invariants:

    1  every node runs exactly once, after all its predecessors; and every graph is a
       correct forward pass (each node reads what it depends on)
    2  a serial resource (a stream) runs one node at a time
    3  memory budgets are never exceeded (KV admission and peak device memory)
    4  every run terminates; with all work present at time zero,
       busiest resource <= makespan <= sum of all node durations
    5  the logits match an unscheduled reference within float tolerance
    +  for static plans, the simulated and the real in-process per-stream orders agree
    +  the execution semantics themselves (a state machine, see `machine.py`)

Policies have their own invariants too (fine-ep: invariant 6, eps: invariant 7, cgopipe
and flexgen: invariant 8), and a
plugin may add some: a scheduler class with a `conformance_checks()` classmethod returning
functions `check(case, result) -> list[str]` gets them run on every simulated case. Failures shrink to a small case whose repr can be pasted into a test.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeflow.dataflow.check import problems as graph_problems
from moeflow.dataflow.graph import Unit
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import Cluster, Scheduler, routes
from moeflow.scheduler.plan import InOrder, Plan, topological_plan
from moeflow.scheduler.requests import Job
from moeflow.sim.simulator import SimResult, SimulationError, Simulator
from moeflow.sim.workload import Routing
from moeflow.testing.machine import SemanticsMachine
from moeflow.testing.strategies import (
    ClusterCase, ModelCase, WorkloadCase, cluster_cases, model_cases, tight_hardware,
    workload_cases,
)


class ConformanceError(AssertionError):
    """A scheduler broke an invariant; the message says which and how."""


@dataclass(frozen=True, slots=True)
class Case:
    model: ModelCase
    cluster: ClusterCase
    workload: WorkloadCase


@st.composite
def cases(draw: st.DrawFn) -> Case:
    model = draw(model_cases(), label="model")
    cluster = draw(cluster_cases(model.experts), label="cluster")
    return Case(model, cluster, draw(workload_cases(), label="workload"))


def simulate(scheduler_cls: type[Scheduler], case: Case) -> tuple[Simulator, SimResult]:
    spec = case.model.spec
    placement = case.cluster.placement
    w = case.workload
    scheduler = scheduler_cls()
    hw = tight_hardware(spec, placement, w.kv_blocks, w.max_batch_tokens, w.max_seqs,
                        reserved=scheduler.reserved_weights(
                            spec, Cluster(placement.devices, placement)))
    routing = Routing.parse(w.routing, spec.moe.num_experts, spec.moe.top_k, spec.num_layers,
                            seed=w.seed)
    sim = Simulator(spec, hw, scheduler, routing, placement=placement,
                    max_batch_tokens=w.max_batch_tokens, max_seqs=w.max_seqs)
    units = [0]

    def well_formed(job: Job) -> None:
        found = graph_problems(job.plan.graph, spec)
        if found:
            raise ConformanceError(f"invariant 1 (precedence): unit {units[0]}: "
                                   + "; ".join(found[:3]))
        units[0] += 1

    return sim, sim.run(w.requests, on_plan=well_formed)


def violations(case: Case, sim: Simulator, result: SimResult) -> list[str]:
    """Invariants 1-4 on one simulated run."""
    out: list[str] = []
    seen: dict[tuple[int, int], int] = {}
    for ev in result.trace:
        seen[(ev.job, ev.node)] = seen.get((ev.job, ev.node), 0) + 1
    end = {(ev.job, ev.node): ev.end for ev in result.trace}
    start = {(ev.job, ev.node): ev.start for ev in result.trace}
    for j, job in enumerate(result.jobs):
        graph = job.plan.graph
        for i in range(len(graph.nodes)):
            if seen.get((j, i), 0) != 1:
                out.append(f"invariant 1: unit {j} node {i} ran {seen.get((j, i), 0)} times")
                continue
            for p in graph.preds(i):
                if end.get((j, p), float("inf")) > start[(j, i)] + 1e-12:
                    out.append(f"invariant 1: unit {j} node {i} started before its "
                               f"predecessor {p} finished")
    groups = {(ev.job, ev.node): ev.group for ev in result.trace}
    for resource, spans in _by_resource(result).items():
        for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
            if s1 < e0 - 1e-12 and groups[a] != groups[b]:  # a coalesced group is one kernel
                out.append(f"invariant 2: {resource} ran {a} and {b} at once "
                           f"({s0:.9f}-{e0:.9f} and {s1:.9f}-{e1:.9f})")
                break
    out.extend(f"invariant 3 (memory): {v}" for v in result.memory_violations[:3])
    if len(result.timings) != len(case.workload.requests):
        out.append(f"invariant 4: {len(result.timings)} of {len(case.workload.requests)} "
                   f"requests finished")
    if case.workload.all_at_zero and result.trace:
        makespan = max(ev.end for ev in result.trace) - min(ev.start for ev in result.trace)
        kernels = {(ev.resource, ev.group): ev.end - ev.start for ev in result.trace}
        busy: dict[str, float] = {}
        for (resource, _), d in kernels.items():
            busy[resource] = busy.get(resource, 0.0) + d
        busiest = max(busy.values())
        total = sum(kernels.values())
        if not busiest <= makespan * (1 + 1e-9) + 1e-12:
            out.append(f"invariant 4: busiest resource {busiest} > makespan {makespan}")
        if not makespan <= total * (1 + 1e-9) + 1e-12:
            out.append(f"invariant 4: makespan {makespan} > sum of durations {total} "
                       f"(time with nothing running)")
    return out


def _by_resource(result: SimResult) -> dict[str, list[tuple[float, float, tuple[int, int]]]]:
    out: dict[str, list[tuple[float, float, tuple[int, int]]]] = {}
    for ev in result.trace:
        out.setdefault(ev.resource, []).append((ev.start, ev.end, (ev.job, ev.node)))
    for spans in out.values():
        spans.sort()
    return out


Check = Callable[[Case, SimResult], list[str]]


def policy_checks(scheduler_cls: type[Scheduler]) -> list[Check]:
    """The invariants specific to a policy: the built-in ones for every policy name in the
    class's ancestry (a subclass of fine-ep keeps invariant 6), plus whatever the class's
    own `conformance_checks()` returns."""
    from moeflow.testing.cgopipe import invariant_8
    from moeflow.testing.eps import invariant_7
    from moeflow.testing.fine_ep import invariant_6

    builtin: dict[str, list[Check]] = {"fine-ep": [invariant_6], "eps": [invariant_7],
                                       "cgopipe": [invariant_8]}
    checks: list[Check] = []
    for klass in scheduler_cls.__mro__:
        checks.extend(builtin.get(klass.__dict__.get("name", ""), []))
    checks.extend(getattr(scheduler_cls, "conformance_checks", lambda: [])())
    return checks


def check_simulated(scheduler_cls: type[Scheduler], case: Case,
                    extra: list[Check] | None = None) -> None:
    try:
        sim, result = simulate(scheduler_cls, case)
    except SimulationError as exc:
        text = str(exc)
        which = ("3 (memory budget)" if "KV blocks" in text else
                 "1 (precedence)" if "precedence" in text else "4 (termination)")
        raise ConformanceError(f"invariant {which}: {text}") from None
    found = violations(case, sim, result)
    for check in extra or []:
        found.extend(check(case, result))
    if found:
        more = f"\n  ... and {len(found) - 6} more" if len(found) > 6 else ""
        raise ConformanceError(f"{scheduler_cls.__name__}:\n  " + "\n  ".join(found[:6]) + more)


# -- invariant 5 and executor agreement (real ops, in process) --------------------------


@functools.lru_cache(maxsize=None)
def _tiny_checkpoint(family: str, layers: int, experts: int, top_k: int) -> Path:
    """A tiny checkpoint of this shape, built once per process and removed at its exit."""
    from moeflow.models.tiny import make_tiny

    out = Path(tempfile.mkdtemp(prefix=f"moeflow-conformance-{family}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    case = ModelCase(family, layers, experts, top_k)
    return make_tiny(family, out, case.shape, tokenizer=False)


class _Reference(Scheduler):
    """The unscheduled reference: everything batched, one device, topological order."""

    name = "reference"

    def form_units(self, waiting, running, budget):  # type: ignore[no-untyped-def]
        from moeflow.scheduler.batch_ep import BatchEP

        return BatchEP().form_units(waiting, running, budget)

    def plan(self, unit: Unit, model: ModelSpec, cluster: Cluster) -> Plan:
        from moeflow.dataflow.compiler import compile

        return topological_plan(compile(model, unit, cluster.placement))


def _workers(case: Case, single: bool):  # type: ignore[no-untyped-def]
    import torch

    from moeflow.actors.inproc import load_workers
    from moeflow.dataflow.graph import Placement
    from moeflow.models.families import load_spec

    m = case.model
    path = _tiny_checkpoint(m.family, m.layers, m.experts, m.top_k)
    spec = load_spec(path)
    placement = (Placement(("cpu:0",), (0,) * m.experts) if single
                 else case.cluster.placement)
    return spec, placement, load_workers(path, spec, placement, torch.float32, kv_tokens=4096)


def record_generation(executor: Any, spec: ModelSpec, scheduler: Scheduler, cluster: Cluster,
                      prompts: list[list[int]], max_new_tokens: int, *,
                      max_batch_tokens: int = 2048, max_seqs: int = 64
                      ) -> tuple[dict[int, list[int]], dict[int, list[Any]]]:
    """Greedy generation through `executor` (built with want_logits=True): each request's
    tokens, and its logits (last row) at every step."""
    from moeflow.serve.engine import EngineCore
    from moeflow.ops.sampling import SamplingParams

    logits: dict[int, list[Any]] = {}
    run_many = executor.run_many

    def recording(jobs):  # type: ignore[no-untyped-def]
        results = run_many(jobs)
        for job, result in zip(jobs, results):
            for i, chunk in enumerate(job.bound_unit.seqs):
                if i in result.logits:
                    logits.setdefault(chunk.seq_id, []).append(result.logits[i][-1])
        return results

    executor.run_many = recording
    try:
        engine = EngineCore(spec, executor, scheduler, cluster, max_batch_tokens=max_batch_tokens,
                            max_seqs=max_seqs)
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        requests = [engine.add_request(p, params) for p in prompts]
        while engine.has_unfinished():
            engine.step()
    finally:
        del executor.run_many
    return {r.request_id: list(r.output_ids) for r in requests}, logits


def assert_same_generation(run: tuple[dict[int, list[int]], dict[int, list[Any]]],
                           reference: tuple[dict[int, list[int]], dict[int, list[Any]]],
                           atol: float = 1e-4) -> None:
    """Two `record_generation` results agree: the same tokens, and every step's logits
    within `atol` (invariant 5 between two policies). A run in which some request made no
    token (its unit failed) agrees with nothing, not even another such run."""
    (tokens, logits), (ref_tokens, ref_logits) = run, reference
    for name, made in (("the run", tokens), ("the reference", ref_tokens)):
        empty = sorted(rid for rid, out in made.items() if not out)
        if empty or not made:
            raise ConformanceError(f"in {name}, requests {empty} made no token")
    if tokens != ref_tokens:
        raise ConformanceError(f"tokens differ: {tokens} against {ref_tokens}")
    _same_logits(logits, ref_logits, atol, "")


def _same_logits(got: dict[int, list[Any]], ref: dict[int, list[Any]], atol: float,
                 prefix: str) -> None:
    """Each request's logits, step by step, within `atol` of the reference's."""
    for seq_id, rows in ref.items():
        mine = got.get(seq_id, [])
        if len(mine) != len(rows):
            raise ConformanceError(f"{prefix}request {seq_id} produced {len(mine)} "
                                   f"logit rows, the reference {len(rows)}")
        for step, (a, b) in enumerate(zip(mine, rows)):
            diff = float((a - b).abs().max())
            if diff > atol:
                raise ConformanceError(f"{prefix}request {seq_id} step {step}: max "
                                       f"|logit - reference| = {diff:.2e} > {atol}")


def run_for_real(scheduler: Scheduler, case: Case, prompts: list[list[int]],
                 max_new_tokens: int) -> dict[int, list[Any]]:
    """Greedy generation in process (routed experts on the kernels the scheduler's
    on_routing picks, if it has one); each request's logits, one row per step."""
    from moeflow.actors.inproc import InProcessExecutor

    spec, placement, workers = _workers(case, single=isinstance(scheduler, _Reference))
    executor = InProcessExecutor(workers, want_logits=True, on_routing=scheduler.on_routing
                                 if routes(scheduler) else None)
    _, logits = record_generation(executor, spec, scheduler,
                                  Cluster(placement.devices, placement), prompts,
                                  max_new_tokens, max_batch_tokens=case.workload.max_batch_tokens,
                                  max_seqs=case.workload.max_seqs)
    return logits


def check_results(scheduler_cls: type[Scheduler], case: Case, atol: float = 1e-4) -> None:
    """Invariant 5: the policy's logits equal the unscheduled reference's."""
    prompts = [[(7 * r.prompt + 11 * i + j) % 500 + 3 for j in range(min(r.prompt, 24))]
               for i, r in enumerate(case.workload.requests[:3])]
    steps = max(1, min(4, max(r.output for r in case.workload.requests)))
    got = run_for_real(scheduler_cls(), case, prompts, steps)
    ref = run_for_real(_Reference(), case, prompts, steps)
    made = sum(1 for rows in ref.values() if rows)
    if made != len(prompts):  # else a fault in both runs would compare nothing with nothing
        raise ConformanceError(f"invariant 5: the reference run made logits for {made} of "
                               f"{len(prompts)} requests")
    _same_logits(got, ref, atol, "invariant 5: ")


def check_static_orders(scheduler_cls: type[Scheduler], case: Case) -> None:
    """Where every stream of the first unit's plan is InOrder, the simulator and the
    in-process executor run that plan's nodes in the same order on each stream."""
    from moeflow.actors.inproc import InProcessExecutor

    _, result = simulate(scheduler_cls, case)
    job = result.jobs[0]
    if not all(isinstance(rule, InOrder) for _, rule in job.plan.rules):
        return
    if any(chunk.start for chunk in job.unit.seqs):
        return
    simulated = {r: [n for j, n in order if j == 0]
                 for r, order in result.stream_orders().items()}
    real: dict[str, list[int]] = {}
    _, _, workers = _workers(case, single=False)
    executor = InProcessExecutor(
        workers, observer=lambda plan, node, stream: real.setdefault(str(stream), []).append(node))
    tokens = {i: [3 + (j % 400) for j in range(c.num_tokens)]
              for i, c in enumerate(job.unit.seqs)}
    executor.run(job.plan, tokens)
    for resource, order in real.items():
        if simulated.get(resource) != order:
            raise ConformanceError(f"{resource}: the simulator ran {simulated.get(resource)} "
                                   f"but the in-process executor {order}")


# -- the suite ---------------------------------------------------------------------


def check_scheduler(scheduler_cls: type[Scheduler], *, max_examples: int | None = None,
                    real_examples: int | None = None) -> None:
    """Run the whole invariant suite on `scheduler_cls` (instantiated with no arguments).

    Example counts come from the active Hypothesis profile (`dev`, `ci`, `nightly`; see
    `moeflow.testing.load_profile`) unless given."""
    if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, Scheduler)):
        raise TypeError(f"{scheduler_cls!r} is not a moeflow.scheduler.Scheduler subclass")
    extra = policy_checks(scheduler_cls)
    base = settings()
    sim_settings = settings(base, max_examples=max_examples or base.max_examples,
                            deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
    real_settings = settings(sim_settings,
                             max_examples=real_examples or max(3, sim_settings.max_examples // 10))

    @sim_settings
    @given(case=cases())
    def simulated(case: Case) -> None:
        check_simulated(scheduler_cls, case, extra)

    @real_settings
    @given(case=cases())
    def real(case: Case) -> None:
        check_results(scheduler_cls, case)
        check_static_orders(scheduler_cls, case)

    simulated()
    real()
    machine = SemanticsMachine.TestCase
    machine.settings = settings(real_settings, stateful_step_count=20)
    machine().runTest()
