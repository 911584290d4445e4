"""What the engine hands an executor, and what it gets back.

An executor ("cluster") runs jobs on its actors, in this process or in others:

    submit(job: JobSpec)          start a unit's plan (returns at once)
    poll(timeout) -> [JobResult]  results of finished jobs (possibly none yet)
    run_many([JobSpec]) -> [JobResult]   both, for a synchronous caller
    release(home, seq_id)         free a finished request's KV cache and sampler
    drop_plans([plan_id])         cached plans that will not run again
    watch() -> [device]           check the actors while idle: devices whose state was lost
    kv_capacity_blocks(), kv_block_size
    close()

Both executors keep their jobs in a `CoordinatorCore`: what each actor is sent for a job
(a cached plan once per actor, then its id), what the actors' replies mean, and which jobs
are done. The executors only carry its messages: by call in this process, over ZeroMQ to
actor processes.

A JobResult carries the token sampled for each sequence that produced logits (sampling
happens on the actor that serves the request), the logits themselves only if asked for,
an error message if the whole job failed, and per-sequence errors for sequences that
could not be sampled (those requests fail alone). `lost` lists devices whose state was lost (an
actor restarted): the engine fails the requests served there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moeflow.actors.messages import Message, NodeFailed, RoutingCounts, RunUnit, UnitPart
from moeflow.actors.tracing import RealTrace
from moeflow.dataflow.graph import Unit
from moeflow.ops.sampling import Logprobs
from moeflow.scheduler.plan import Plan


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    plan: Plan
    tokens: dict[int, list[int]]  # unit seq index -> new token ids
    sampling: dict[int, dict[str, Any]] = field(default_factory=dict)  # seq id -> params
    unit: Unit | None = None  # what runs, bound to a cached plan; None: the plan's own unit
    plan_id: int | None = None  # the cached plan's id (it travels once to each actor)

    @property
    def bound_unit(self) -> Unit:
        return self.plan.graph.unit if self.unit is None else self.unit


@dataclass
class JobResult:
    job_id: int
    tokens: dict[int, int] = field(default_factory=dict)  # unit seq index -> token
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    error: str | None = None  # the whole job failed
    # it failed for no fault of its requests (an actor died, a message was lost): they
    # may run again
    retry: bool = False
    lost: tuple[str, ...] = ()
    errors: dict[int, str] = field(default_factory=dict)  # unit seq index -> why it failed
    logprobs: dict[int, Logprobs] = field(default_factory=dict)  # for requests that asked


class JobTracker:
    """Which actors still owe a share of each job, and the merged result so far."""

    def __init__(self) -> None:
        self.waiting: dict[int, set[str]] = {}
        self.results: dict[int, JobResult] = {}

    def start(self, job_id: int, actors: set[str]) -> None:
        self.waiting[job_id] = set(actors)
        self.results[job_id] = JobResult(job_id)

    def part(self, job_id: int, actor: str, tokens: dict[int, int],
             logits: dict[int, torch.Tensor], errors: dict[int, str] | None = None,
             logprobs: dict[int, Logprobs] | None = None) -> JobResult | None:
        """Record an actor's share; the result once every share is in."""
        if job_id not in self.waiting:
            return None
        result = self.results[job_id]
        result.tokens.update(tokens)
        result.logits.update(logits)
        result.errors.update(errors or {})
        result.logprobs.update(logprobs or {})
        self.waiting[job_id].discard(actor)
        if self.waiting[job_id]:
            return None
        del self.waiting[job_id]
        return self.results.pop(job_id)

    def fail(self, job_id: int, error: str, retry: bool = False) -> JobResult | None:
        if job_id not in self.waiting:
            return None
        del self.waiting[job_id]
        result = self.results.pop(job_id)
        result.error, result.retry = error, retry
        return result

    def involving_any(self) -> list[int]:
        return list(self.waiting)

    def involving(self, actor: str) -> list[int]:
        return [j for j, actors in self.waiting.items() if actor in actors]

    def __len__(self) -> int:
        return len(self.waiting)


class Executor(Protocol):
    """What the engine runs jobs on (see the module docstring): `InProcessExecutor` and
    `ZmqExecutor` implement it."""

    def submit(self, job: JobSpec) -> None: ...

    def poll(self, timeout: float | None = None) -> list[JobResult]: ...

    def run_many(self, jobs: list[JobSpec]) -> list[JobResult]: ...

    def release(self, home: str, seq_id: int) -> None: ...

    def drop_plans(self, plan_ids: list[int]) -> None: ...

    def watch(self) -> list[str]: ...

    def kv_capacity_blocks(self) -> dict[str, int]: ...

    @property
    def kv_block_size(self) -> int: ...

    @property
    def routing(self) -> dict[int, list[int]] | None: ...

    def close(self) -> None: ...


class _Submits(Protocol):
    def submit(self, job: JobSpec) -> None: ...
    def poll(self, timeout: float | None = None) -> list[JobResult]: ...


def run_jobs(executor: _Submits, jobs: list[JobSpec]) -> list[JobResult]:
    """Submit `jobs` and poll until all are done: an executor's `run_many`."""
    for job in jobs:
        executor.submit(job)
    results: dict[int, JobResult] = {}
    while len(results) < len(jobs):
        for r in executor.poll():
            results[r.job_id] = r
    return [results[j.job_id] for j in jobs]


class CoordinatorCore:
    """The coordinator's logic, whatever carries its messages (see the module docstring).
    `want_logits` asks every actor for logits; `record_routing` sums the rows routed to
    each expert per layer into `routing`; `trace` writes every job's nodes as its actors
    timed them (see moeflow.actors.tracing)."""

    def __init__(self, actors: Iterable[str], want_logits: bool = False,
                 record_routing: bool = False, trace: RealTrace | None = None) -> None:
        self.want_logits = want_logits
        self.trace = trace  # every job's nodes, timed by its actors
        self.routing: dict[int, list[int]] | None = {} if record_routing else None
        self.tracker = JobTracker()
        self.done: list[JobResult] = []
        self.plans: dict[str, set[int]] = {a: set() for a in actors}  # cached plans each holds

    def submit(self, job: JobSpec) -> list[tuple[str, RunUnit]]:
        """Start tracking `job`; the RunUnit each of its actors is to get. The plan itself
        goes to an actor that does not hold it yet; one that does gets its id."""
        actors = set(job.plan.actors())
        unknown = actors - set(self.plans)
        if unknown:
            raise ValueError(f"the plan uses actors {sorted(unknown)} this executor lacks")
        self.tracker.start(job.job_id, actors)
        traced = self.trace is not None
        if self.trace is not None:
            self.trace.begin(job.job_id, job.plan)
        whole = brief = None
        out = []
        for name in sorted(actors):
            held = self.plans[name]
            if job.plan_id is not None and job.plan_id in held:
                brief = brief or RunUnit(job.job_id, None, job.tokens, job.sampling,
                                         self.want_logits, job.unit, job.plan_id, traced,
                                         self.routing is not None)
                out.append((name, brief))
            else:
                whole = whole or RunUnit(job.job_id, job.plan, job.tokens, job.sampling,
                                         self.want_logits, job.unit, job.plan_id, traced,
                                         self.routing is not None)
                out.append((name, whole))
                if job.plan_id is not None:
                    held.add(job.plan_id)
        return out

    def expects(self, actor: str, unit_id: int) -> bool:
        """Whether `actor` still owes a share of job `unit_id`."""
        return actor in self.tracker.waiting.get(unit_id, ())

    def reply(self, msg: Message) -> list[int]:
        """An actor's UnitPart, RoutingCounts or NodeFailed taken in; the jobs that failed
        because of it (their actors are to abort them)."""
        if isinstance(msg, UnitPart):
            if self.trace is not None and self.expects(msg.actor, msg.unit_id):
                self.trace.part(msg)
            result = self.tracker.part(msg.unit_id, msg.actor, msg.tokens, msg.logits,
                                       msg.errors, msg.logprobs)
            if result is not None:
                self.done.append(result)
                if self.trace is not None:
                    self.trace.end(msg.unit_id)
        elif isinstance(msg, RoutingCounts):
            if self.routing is not None:
                total = self.routing.setdefault(msg.layer, [0] * len(msg.counts))
                for e, c in enumerate(msg.counts):
                    total[e] += c
        elif isinstance(msg, NodeFailed):
            return self.fail([msg.unit_id], f"{msg.actor}: {msg.error}")
        else:
            raise TypeError(f"a {type(msg).__name__} is not a reply")
        return []

    def fail(self, unit_ids: Iterable[int], error: str, retry: bool = False) -> list[int]:
        """Fail the jobs still in flight among `unit_ids`; those failed now. `retry`: for no
        fault of their requests (see JobResult)."""
        failed = []
        for unit_id in unit_ids:
            result = self.tracker.fail(unit_id, error, retry)
            if result is not None:
                self.done.append(result)
                failed.append(unit_id)
                if self.trace is not None:
                    self.trace.end(unit_id)
        return failed

    def restarted(self, actor: str) -> None:
        """`actor` lost its state: it holds no cached plan any more."""
        self.plans[actor] = set()

    def drop_plans(self, plan_ids: Iterable[int]) -> dict[str, tuple[int, ...]]:
        """Cached plans that will not run again: which each actor holding some should drop."""
        dropped = set(plan_ids)
        out = {}
        for name, held in self.plans.items():
            gone = held & dropped
            if gone:
                held -= gone
                out[name] = tuple(sorted(gone))
        return out

    def close_trace(self) -> None:
        """Complete the trace file, if one is written, and trace no more jobs (the
        executor is closing; or a caller set `trace` for a while)."""
        trace, self.trace = self.trace, None
        if trace is not None:
            trace.close()

    def take_done(self) -> list[JobResult]:
        done, self.done = self.done, []
        return done
