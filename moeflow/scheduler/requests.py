"""RequestBook: the pure bookkeeping of requests between a scheduler and an executor.

It holds what every engine needs and nothing about tokens or tensors:
    - each sequence's counts (prompt, generated, cached) and where it lives;
    - which sequences are in a unit in flight (a scheduler only sees the idle ones);
    - a KV-cache ledger per device, in blocks, from which the scheduler's Budget comes;
    - preemption: when the running sequences' next tokens do not fit, the newest is evicted
      and later recomputed from its prompt and outputs so far.

    schedule()       ask the scheduler for units, check them, reserve their KV, mark their
                     sequences in flight, and plan them (from `plan_cache` when given) ->
                     [Job]; sequences it preempted are listed in `evicted` for the
                     executor to free
    complete(job)    the job's forward pass is done: its sequences' KV now holds the
                     tokens; returns the sequences that produced logits (to sample from)
    requeue(job, ..) the job failed: its sequences end, or (for no fault of theirs: an
                     actor died) wait again, to be recomputed, as preempted ones are

The real engine (`moeflow.serve.engine`) adds token ids and sampling; the simulator adds a
clock and a cost model. Both drive the same book, so they admit, batch and preempt alike.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from moeflow.dataflow.graph import Unit
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import Budget, Cluster, RequestView, Scheduler
from moeflow.scheduler.plan import Plan
from moeflow.scheduler.plan_cache import PlanCache


class SchedulingError(RuntimeError):
    """A scheduler returned units that break the contract (unknown, finished or busy
    sequences, a wrong start, a moved home, or more KV than the budget)."""


KV_FULL = "kv_full"  # a finish reason: the sequence outgrew its device's KV cache alone


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Seq:
    seq_id: int
    num_prompt: int
    max_new_tokens: int
    arrival: float
    num_output: int = 0
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    home: str | None = None
    in_flight: bool = False
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prompt + self.num_output

    def view(self) -> RequestView:
        return RequestView(self.seq_id, self.num_prompt, self.num_computed, self.num_output,
                           self.max_new_tokens, self.arrival, self.home)


@dataclass(frozen=True)
class Completed:
    """What a finished job changed: the sequences to sample a token for, and the KV the
    executor may now free (sequences that finished while the job ran)."""

    sampled: list[int]
    released: list[tuple[str, int]]


@dataclass(frozen=True)
class Job:
    """One unit, its plan, and the book's id for it. With a plan cache, the plan may have
    been compiled for another unit of the same shape (`plan_id` names it): `unit` is what
    this job runs."""

    job_id: int
    unit: Unit
    plan: Plan
    plan_id: int | None = None


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class RequestBook:
    def __init__(self, scheduler: Scheduler, model: ModelSpec, cluster: Cluster,
                 kv_blocks: dict[str, int], kv_block_size: int, *,
                 max_batch_tokens: int = 2048, max_seqs: int = 64,
                 plan_cache: PlanCache | None = None) -> None:
        if kv_block_size < 1:
            raise ValueError(f"kv_block_size must be >= 1, got {kv_block_size}")
        self.scheduler = scheduler
        self.model = model
        self.cluster = cluster
        self.kv_capacity = dict(kv_blocks)
        self.kv_used = {d: 0 for d in kv_blocks}
        self.block_size = kv_block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.seqs: dict[int, Seq] = {}
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.in_flight: dict[int, Job] = {}
        self._reserved: dict[int, int] = {}  # seq -> KV length its blocks are charged for
        self.evicted: list[tuple[str, int]] = []  # preempted (home, seq): executor frees KV
        self.num_preemptions = 0  # sequences preempted so far (to be recomputed)
        self.kv_full: list[int] = []  # ended at their device's KV capacity (KV_FULL): the
        # engine says so and frees their KV as for any finish
        self._job_ids = itertools.count()
        self.plan_cache = plan_cache  # None: every unit planned anew (the simulator)

    # -- requests ------------------------------------------------------------------

    def add(self, seq_id: int, num_prompt: int, max_new_tokens: int, arrival: float) -> Seq:
        if seq_id in self.seqs:
            raise ValueError(f"sequence id {seq_id} is already in use")
        if num_prompt < 1:
            raise ValueError("the prompt is empty")
        seq = Seq(seq_id, num_prompt, max_new_tokens, arrival)
        self.seqs[seq_id] = seq
        self.waiting.append(seq_id)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def free_kv_blocks(self) -> dict[str, int]:
        return {d: self.kv_capacity[d] - self.kv_used[d] for d in self.kv_capacity}

    @property
    def kv_tokens(self) -> int:
        """The tokens one sequence can hold alone on any serving device: past them its KV
        cannot grow, whatever is evicted for it."""
        return min(self.kv_capacity.values(), default=0) * self.block_size

    def __iter__(self) -> Iterator[Seq]:
        return iter(self.seqs.values())

    # -- scheduling ----------------------------------------------------------------

    def schedule(self) -> list[Job]:
        """Units for the idle sequences, planned and with their KV reserved."""
        self._preempt_if_full()
        idle_running = [self.seqs[s].view() for s in self.running if not self.seqs[s].in_flight]
        waiting = [self.seqs[s].view() for s in self.waiting]
        if not idle_running and not waiting:
            return []
        tokens = sum(j.unit.num_tokens for j in self.in_flight.values())
        seqs = sum(len(j.unit.seqs) for j in self.in_flight.values())
        budget = Budget(self.max_batch_tokens - tokens, self.max_seqs - seqs,
                        self.free_kv_blocks(), self.block_size,
                        units_in_flight=len(self.in_flight))
        if budget.max_tokens <= 0 or budget.max_seqs <= 0:
            return []
        jobs = []
        for unit in self.scheduler.form_units(waiting, idle_running, budget):
            tokens += unit.num_tokens
            seqs += len(unit.seqs)
            if tokens > self.max_batch_tokens or seqs > self.max_seqs:
                raise SchedulingError(
                    f"scheduler {self.scheduler.name!r} put {tokens} tokens of {seqs} "
                    f"sequences in flight; the budget is {self.max_batch_tokens} tokens and "
                    f"{self.max_seqs} sequences")
            self._admit(unit)
            if self.plan_cache is not None:
                plan_id, plan = self.plan_cache.plan(self.scheduler, unit, self.model,
                                                     self.cluster)
            else:
                plan_id, plan = None, self.scheduler.plan(unit, self.model, self.cluster)
                if plan.graph.unit != unit:
                    raise SchedulingError(f"scheduler {self.scheduler.name!r} planned a "
                                          f"different unit than it formed")
            job = Job(next(self._job_ids), unit, plan, plan_id)
            self.in_flight[job.job_id] = job
            jobs.append(job)
        return jobs

    def _admit(self, unit: Unit) -> None:
        name = self.scheduler.name
        charges: dict[str, int] = {}
        for chunk in unit.seqs:
            seq = self.seqs.get(chunk.seq_id)
            if seq is None or seq.status is SeqStatus.FINISHED:
                raise SchedulingError(f"scheduler {name!r} scheduled unknown or finished "
                                      f"sequence {chunk.seq_id}")
            if seq.in_flight:
                raise SchedulingError(f"scheduler {name!r} scheduled sequence {chunk.seq_id} "
                                      f"while it is in flight")
            if chunk.start != seq.num_computed:
                raise SchedulingError(f"scheduler {name!r} resumed sequence {chunk.seq_id} at "
                                      f"{chunk.start}; its KV holds {seq.num_computed}")
            if chunk.start + chunk.num_tokens > seq.num_tokens:
                raise SchedulingError(f"scheduler {name!r} advanced sequence {chunk.seq_id} "
                                      f"past its {seq.num_tokens} known tokens")
            if seq.home is not None and chunk.home != seq.home:
                raise SchedulingError(f"scheduler {name!r} moved sequence {chunk.seq_id} from "
                                      f"{seq.home} to {chunk.home}; its KV cannot move")
            if chunk.home not in self.kv_capacity:
                raise SchedulingError(f"scheduler {name!r} homed sequence {chunk.seq_id} on "
                                      f"{chunk.home}, which serves no requests")
            new = chunk.start + chunk.num_tokens
            charges[chunk.home] = charges.get(chunk.home, 0) + (
                blocks_for(new, self.block_size)
                - blocks_for(self._reserved.get(chunk.seq_id, 0), self.block_size))
        free = self.free_kv_blocks()
        for device, need in charges.items():
            if need > free[device]:
                raise SchedulingError(f"scheduler {name!r} needs {need} KV blocks on {device}, "
                                      f"{free[device]} are free")
        for chunk in unit.seqs:
            seq = self.seqs[chunk.seq_id]
            new = chunk.start + chunk.num_tokens
            self.kv_used[chunk.home] += (blocks_for(new, self.block_size)
                                         - blocks_for(self._reserved.get(seq.seq_id, 0),
                                                      self.block_size))
            self._reserved[seq.seq_id] = new
            seq.in_flight = True
            if seq.status is SeqStatus.WAITING:
                self.waiting.remove(seq.seq_id)
                self.running.append(seq.seq_id)
                seq.status = SeqStatus.RUNNING
                seq.home = chunk.home

    def _preempt_if_full(self) -> None:
        """While the idle running sequences' next tokens do not fit on a device, evict the
        newest sequence there. If that one is in flight, wait for it to come back instead:
        evicting an older idle one in its place would let two sequences that take turns
        in flight evict each other for ever (sequences in flight keep their reservations).
        A sequence alone on its device that does not fit ends (KV_FULL, in `kv_full`)."""
        while True:
            need: dict[str, int] = {}
            for s in self.running:
                seq = self.seqs[s]
                if not seq.in_flight and seq.num_computed % self.block_size == 0:
                    assert seq.home is not None  # a running sequence has a home
                    need[seq.home] = need.get(seq.home, 0) + 1
            free = self.free_kv_blocks()
            victims, ended = [], False
            for device, n in need.items():
                if n <= free[device]:
                    continue
                there = [s for s in self.running if self.seqs[s].home == device]
                if len(there) == 1:  # alone and still short: evicted, it would come back
                    # to the same wall for ever; it ends where its device's KV does
                    self.finish(there[0], KV_FULL)
                    self.kv_full.append(there[0])
                    ended = True
                    continue
                newest = there[-1]
                if not self.seqs[newest].in_flight:
                    victims.append(newest)
            if not victims and not ended:
                return
            for seq_id in victims:
                self.preempt(seq_id)

    def preempt(self, seq_id: int) -> None:
        """Drop an idle sequence's KV; it waits again and is recomputed later."""
        seq = self.seqs[seq_id]
        if seq.in_flight or seq.status is not SeqStatus.RUNNING:
            raise ValueError(f"sequence {seq_id} cannot be preempted now")
        self._release_kv(seq)
        self.evicted.append((seq.home, seq_id))  # type: ignore[arg-type]
        self.running.remove(seq_id)
        seq.status, seq.home, seq.num_computed = SeqStatus.WAITING, None, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq_id)

    # -- completion ----------------------------------------------------------------

    def complete(self, job: Job) -> Completed:
        """Record that `job` ran."""
        del self.in_flight[job.job_id]
        sampled, released = [], []
        for chunk in job.unit.seqs:
            seq = self.seqs[chunk.seq_id]
            seq.in_flight = False
            if seq.status is SeqStatus.FINISHED:  # ended while the job ran
                self._release_kv(seq)
                released.append((chunk.home, seq.seq_id))
                continue
            seq.num_computed = chunk.start + chunk.num_tokens
            if chunk.logits != "none":
                sampled.append(seq.seq_id)
        return Completed(sampled, released)

    def requeue(self, job: Job, again: set[int], reason: str) -> Completed:
        """`job` did not finish: the sequences in `again` (it failed for no fault of
        theirs: an actor died) wait again, their KV dropped, to be recomputed from prompt
        and outputs (as a preempted sequence is); the others end with `reason`."""
        for chunk in job.unit.seqs:
            if chunk.seq_id not in again:
                self.finish(chunk.seq_id, reason)
        done = self.complete(job)
        for chunk in reversed(job.unit.seqs):  # each goes first in line: in their order
            if self.seqs[chunk.seq_id].status is SeqStatus.RUNNING:
                self.preempt(chunk.seq_id)
        return Completed([], done.released)

    def add_output(self, seq_id: int) -> Seq:
        seq = self.seqs[seq_id]
        seq.num_output += 1
        return seq

    def finish(self, seq_id: int, reason: str) -> bool:
        """End a sequence (done, aborted or failed). Returns whether its KV is freed now;
        for a sequence in flight that happens when its job completes."""
        seq = self.seqs[seq_id]
        if seq.status is SeqStatus.FINISHED:
            return False
        freed = False
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq_id)
            if not seq.in_flight:
                self._release_kv(seq)
                freed = True
        else:
            self.waiting.remove(seq_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        return freed

    def pop(self, seq_id: int) -> Seq:
        seq = self.seqs.pop(seq_id)
        if seq.status is not SeqStatus.FINISHED:
            raise ValueError(f"sequence {seq_id} has not finished")
        return seq

    def _release_kv(self, seq: Seq) -> None:
        reserved = self._reserved.pop(seq.seq_id, 0)
        if seq.home is not None:
            self.kv_used[seq.home] -= blocks_for(reserved, self.block_size)

    def unschedulable(self) -> int | None:
        """The oldest waiting sequence if nothing runs and it still was not admitted (its
        prompt cannot fit at all), else None."""
        if self.running or self.in_flight or not self.waiting:
            return None
        return self.waiting[0]
