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

A JobResult carries the token sampled for each sequence that produced logits (sampling
happens on the actor that serves the request), the logits themselves only if asked for,
an error message if the whole job failed, and per-sequence errors for sequences that
could not be sampled (those requests fail alone). `lost` lists devices whose state was lost (an
actor restarted): the engine fails the requests served there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moeflow.dataflow.graph import Unit
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
    lost: tuple[str, ...] = ()
    errors: dict[int, str] = field(default_factory=dict)  # unit seq index -> why it failed


class JobTracker:
    """Which actors still owe a share of each job, and the merged result so far."""

    def __init__(self) -> None:
        self.waiting: dict[int, set[str]] = {}
        self.results: dict[int, JobResult] = {}

    def start(self, job_id: int, actors: set[str]) -> None:
        self.waiting[job_id] = set(actors)
        self.results[job_id] = JobResult(job_id)

    def part(self, job_id: int, actor: str, tokens: dict[int, int],
             logits: dict[int, torch.Tensor], errors: dict[int, str] | None = None
             ) -> JobResult | None:
        """Record an actor's share; the result once every share is in."""
        if job_id not in self.waiting:
            return None
        result = self.results[job_id]
        result.tokens.update(tokens)
        result.logits.update(logits)
        result.errors.update(errors or {})
        self.waiting[job_id].discard(actor)
        if self.waiting[job_id]:
            return None
        del self.waiting[job_id]
        return self.results.pop(job_id)

    def fail(self, job_id: int, error: str) -> JobResult | None:
        if job_id not in self.waiting:
            return None
        del self.waiting[job_id]
        result = self.results.pop(job_id)
        result.error = error
        return result

    def involving_any(self) -> list[int]:
        return list(self.waiting)

    def involving(self, actor: str) -> list[int]:
        return [j for j, actors in self.waiting.items() if actor in actors]

    def __len__(self) -> int:
        return len(self.waiting)


def plan_actors(plan: Plan) -> set[str]:
    return {s.actor for s in plan.assignment}


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
