"""EngineCore: requests in, tokens out, one synchronous step at a time.

    step() = schedule -> run -> postprocess
        schedule     the scheduler forms units from waiting and running requests (as plain
                     RequestViews) and plans each one;
        run          the executor runs the plans;
        postprocess  sample a token for every sequence that produced logits, check stops,
                     free the KV of finished requests.

The engine owns request state and memory accounting (it preempts the newest running
request when the KV cache cannot hold everyone's next token); the scheduler owns the policy.
`moeflow.LLM` drives it synchronously, `moeflow.AsyncEngine` from an event loop.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch

from moeflow.dataflow.graph import Unit
from moeflow.models.spec import ModelSpec
from moeflow.models.tokenizer import Tokenizer
from moeflow.scheduler.base import Budget, Cluster, RequestView, Scheduler
from moeflow.scheduler.plan import Plan
from moeflow.serve.sampling import SamplingParams, make_generator, sample


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Executor(Protocol):
    def run_many(self, jobs: list[tuple[Plan, dict[int, list[int]]]]
                 ) -> list[dict[int, torch.Tensor]]: ...

    def release(self, home: str, seq_id: int) -> None: ...

    def free_kv_blocks(self) -> dict[str, int]: ...

    @property
    def kv_block_size(self) -> int: ...


@dataclass
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    home: str | None = None
    num_computed: int = 0
    finish_reason: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    stop_text_end: int | None = None  # where a stop string cut the text
    generator: torch.Generator | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def view(self) -> RequestView:
        return RequestView(self.request_id, len(self.prompt_ids), self.num_computed,
                           len(self.output_ids), self.params.max_new_tokens, self.arrival,
                           self.home)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: int
    token_id: int
    finished: bool
    finish_reason: str | None = None


class EngineCore:
    def __init__(self, spec: ModelSpec, executor: Executor, scheduler: Scheduler,
                 cluster: Cluster, tokenizer: Tokenizer | None = None, *,
                 max_batch_tokens: int = 2048, max_seqs: int = 64,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.spec = spec
        self.executor = executor
        self.scheduler = scheduler
        self.cluster = cluster
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.clock = clock
        self.requests: dict[int, Request] = {}
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self._ids = itertools.count()
        self.eos_ids = frozenset(spec.eos_token_ids)

    # -- requests ------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: int | None = None) -> Request:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {self.spec.vocab_size})")
        limit = self.spec.max_position_embeddings
        if len(prompt_ids) >= limit:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context "
                             f"holds {limit}")
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid} is already in use")
        req = Request(rid, list(prompt_ids), params, self.clock(),
                      generator=make_generator(params))
        self.requests[rid] = req
        self.waiting.append(rid)
        return req

    def abort(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is not None and req.status is not Status.FINISHED:
            self._finish(req, "abort")

    def pop_finished(self, request_id: int) -> Request:
        req = self.requests.pop(request_id)
        assert req.status is Status.FINISHED
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- the step ------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        units = self._schedule()
        if not units:
            if self.running or self.waiting:
                self._fail_unschedulable()
            return []
        jobs = []
        for unit in units:
            plan = self.scheduler.plan(unit, self.spec, self.cluster)
            tokens = {i: self.requests[c.seq_id].all_ids[c.start:c.start + c.num_tokens]
                      for i, c in enumerate(unit.seqs)}
            jobs.append((plan, tokens))
        results = self.executor.run_many(jobs)
        events: list[TokenEvent] = []
        for unit, logits in zip(units, results):
            events.extend(self._postprocess(unit, logits))
        return events

    def _schedule(self) -> list[Unit]:
        self._preempt_if_full()
        views_waiting = [self.requests[r].view() for r in self.waiting]
        views_running = [self.requests[r].view() for r in self.running]
        budget = Budget(self.max_batch_tokens, self.max_seqs, self.executor.free_kv_blocks(),
                        self.executor.kv_block_size)
        units = self.scheduler.form_units(views_waiting, views_running, budget)
        for unit in units:
            for chunk in unit.seqs:
                req = self.requests.get(chunk.seq_id)
                if req is None or req.status is Status.FINISHED:
                    raise RuntimeError(f"scheduler {self.scheduler.name!r} scheduled unknown "
                                       f"or finished request {chunk.seq_id}")
                if chunk.start != req.num_computed:
                    raise RuntimeError(f"scheduler {self.scheduler.name!r} resumed request "
                                       f"{chunk.seq_id} at {chunk.start}, its KV holds "
                                       f"{req.num_computed}")
                if req.status is Status.WAITING:
                    self.waiting.remove(req.request_id)
                    self.running.append(req.request_id)
                    req.status = Status.RUNNING
                    req.home = chunk.home
                elif chunk.home != req.home:
                    raise RuntimeError(f"scheduler moved request {chunk.seq_id} from "
                                       f"{req.home} to {chunk.home}; its KV cannot move")
        return units

    def _preempt_if_full(self) -> None:
        """Free the newest running requests while the others' next tokens do not fit."""
        block = self.executor.kv_block_size
        while self.running:
            free = self.executor.free_kv_blocks()
            need: dict[str, int] = {}
            for rid in self.running:
                req = self.requests[rid]
                if not req.num_computed % block and req.num_computed:
                    need[req.home] = need.get(req.home, 0) + 1  # type: ignore[index]
            if all(need.get(d, 0) <= free.get(d, 0) for d in need):
                return
            victim = self.requests[self.running.pop()]
            self.executor.release(victim.home, victim.request_id)  # type: ignore[arg-type]
            # a preempted request is recomputed later from its prompt and outputs so far
            victim.status, victim.home, victim.num_computed = Status.WAITING, None, 0
            self.waiting.appendleft(victim.request_id)

    def _fail_unschedulable(self) -> None:
        """Nothing could be scheduled although requests wait: the oldest cannot fit at all."""
        if self.running:
            return
        rid = self.waiting[0]
        self._finish(self.requests[rid], "error: the prompt does not fit in the KV cache")

    def _postprocess(self, unit: Unit, logits: dict[int, torch.Tensor]) -> list[TokenEvent]:
        now = self.clock()
        events = []
        for i, chunk in enumerate(unit.seqs):
            req = self.requests[chunk.seq_id]
            req.num_computed = chunk.start + chunk.num_tokens
            if req.status is Status.FINISHED or i not in logits:
                continue
            token = sample(logits[i][-1], req.params, req.generator)
            req.output_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            reason = self._stop_reason(req, token)
            if reason is not None:
                self._finish(req, reason, now)
            events.append(TokenEvent(req.request_id, token, reason is not None, reason))
        return events

    def _stop_reason(self, req: Request, token: int) -> str | None:
        params = req.params
        if token in params.stop_token_ids:
            return "stop"
        if token in self.eos_ids and not params.ignore_eos:
            return "stop"
        if params.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(req.output_ids)
            window = max(len(s) for s in params.stop) + 16
            hits = [text.find(s, max(0, len(text) - window - 16)) for s in params.stop]
            found = [h for h in hits if h >= 0]
            if found:
                req.stop_text_end = min(found)
                return "stop"
        if len(req.output_ids) >= params.max_new_tokens:
            return "length"
        if len(req.all_ids) >= self.spec.max_position_embeddings:
            return "length"
        return None

    def _finish(self, req: Request, reason: str, now: float | None = None) -> None:
        if req.status is Status.RUNNING:
            self.running.remove(req.request_id)
            self.executor.release(req.home, req.request_id)  # type: ignore[arg-type]
        elif req.status is Status.WAITING:
            self.waiting.remove(req.request_id)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = self.clock() if now is None else now

    def text_of(self, req: Request) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(req.output_ids)
        return text if req.stop_text_end is None else text[:req.stop_text_end]
