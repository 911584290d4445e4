"""EngineCore: requests in, tokens out.

    schedule() -> [Job]            units for idle requests, planned, KV reserved
    job_spec(job) -> JobSpec       what the executor runs: the plan, new token ids, sampling
    complete(job, result)          take the sampled tokens, check stops, free what finished

A request whose job failed for no fault of its own (an actor died or stopped answering, a
message was lost: the executor says `retry`), or whose KV cache was lost with an actor,
runs again once the actor is back: it waits again and is recomputed from its prompt and
the tokens it has, as a preempted request is. Each request runs again at most
MAX_RETRIES times; after that it fails with the error (a request that itself kills its
actor must not take it down for ever).

`step()` does the three in order for a synchronous caller (`moeflow.LLM`); an async caller
(`moeflow.AsyncEngine`) schedules whenever work may start and completes each job as it
finishes. Counting, admission and memory live in the pure `RequestBook` (shared with the
simulator); this class adds what needs tokens: the ids themselves and stops. Sampling
happens where the logits are, on the actor that serves the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field


from moeflow.models.spec import ModelSpec
from moeflow.models.tokenizer import IncrementalDecoder, Tokenizer
from moeflow.scheduler.base import Cluster, Scheduler
from moeflow.scheduler.plan_cache import DEFAULT_CAPACITY, PlanCache
from moeflow.scheduler.requests import Job, RequestBook, Seq, SeqStatus
from moeflow.actors.cluster import Executor, JobResult, JobSpec
from moeflow.ops.sampling import Logprobs, SamplingParams

log = logging.getLogger("moeflow.engine")
MAX_RETRIES = 1  # times a request runs again after losing its actor (see the docstring)


@dataclass
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    stop_text_end: int | None = None  # where a stop string cut `stop_text`
    # with stop strings: the output's text so far, decoded a few tokens at a time, kept in
    # pieces (appending to one string copies it whole each token); its length; its end,
    # where a stop string may have begun that the last search could not see whole
    stop_pieces: list[str] = field(default_factory=list)
    stop_len: int = 0
    stop_tail: str = ""
    stop_decoder: IncrementalDecoder | None = None
    # with `params.logprobs`: each output token's log-probability and the top tokens'
    logprobs: list[Logprobs] = field(default_factory=list)
    retries: int = 0  # times it ran again after losing its actor

    @property
    def stop_text(self) -> str:
        return "".join(self.stop_pieces)

    @property
    def num_ids(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def ids(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of the prompt and output together, without joining the two
        (a step reads its few new tokens; a join would copy the whole sequence each step)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _again(reason: str, req: Request) -> str:
    """Why a request that lost its actor ends: with how often it had run again already."""
    if not req.retries:
        return reason
    return f"{reason} (it had already run again {req.retries}x after losing an actor)"


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: int
    token_id: int
    finished: bool
    finish_reason: str | None = None
    logprobs: Logprobs | None = None  # if the request asked for them


class EngineCore:
    def __init__(self, spec: ModelSpec, executor: Executor, scheduler: Scheduler,
                 cluster: Cluster, tokenizer: Tokenizer | None = None, *,
                 max_batch_tokens: int = 2048, max_seqs: int = 64,
                 clock: Callable[[], float] = time.perf_counter,
                 num_cached_plans: int = DEFAULT_CAPACITY) -> None:
        self.spec = spec
        self.executor = executor
        self.scheduler = scheduler
        self.cluster = cluster
        self.tokenizer = tokenizer
        self.clock = clock
        self.plans = PlanCache(num_cached_plans)  # compiled once per unit shape
        self.book = RequestBook(scheduler, spec, cluster, executor.kv_capacity_blocks(),
                                executor.kv_block_size, max_batch_tokens=max_batch_tokens,
                                max_seqs=max_seqs, plan_cache=self.plans)
        self.requests: dict[int, Request] = {}
        self._zombies: set[int] = set()  # popped while their unit was still in flight
        self.num_retries = 0  # requests run again after losing their actor, so far
        # requests in flight when a device they need lost its state: why, to run again (or
        # fail) once their job is back (`lose`)
        self._stale: dict[int, str] = {}
        self._next_id = 0
        self.eos_ids = frozenset(spec.eos_token_ids)
        # the tokens a request may reach: the model's context, or less where a device's KV
        # cache holds less (a sequence alone there could not grow past it)
        self.context = min(spec.max_position_embeddings, self.book.kv_tokens)

    # -- requests ------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: int | None = None) -> Request:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if params.stop and self.tokenizer is None:  # they could never match: say so
            raise ValueError("stop strings need the checkpoint's tokenizer (tokenizer.json), "
                             "which this one lacks: use stop_token_ids instead")
        bad = [t for t in prompt_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {self.spec.vocab_size})")
        if len(prompt_ids) >= self.context:  # room for one new token at least
            holds = ("the model's context holds"
                     if self.context == self.spec.max_position_embeddings else
                     "a device's KV cache (kv_cache_tokens) holds")
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; {holds} "
                             f"{self.context}")
        if request_id is None:
            request_id = self._next_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id} is already in use")
        self._next_id = max(self._next_id, request_id + 1)
        req = Request(request_id, list(prompt_ids), params, self.clock())
        self.book.add(request_id, len(prompt_ids), params.max_new_tokens, req.arrival)
        self.requests[request_id] = req
        return req

    def abort(self, request_id: int, reason: str = "abort") -> None:
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            self._finish(req, reason)

    def pop_finished(self, request_id: int) -> Request:
        req = self.requests.pop(request_id)
        assert req.finished
        if self.book.seqs[request_id].in_flight:
            self._zombies.add(request_id)  # the book lets go when its unit completes
        else:
            self.book.pop(request_id)
        return req

    def has_unfinished(self) -> bool:
        return self.book.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return self.book.num_unfinished

    # -- the step ------------------------------------------------------------------

    def schedule(self) -> list[Job]:
        jobs = self.book.schedule()
        while self.book.evicted:
            self.executor.release(*self.book.evicted.pop())
        while self.book.kv_full:  # outgrew its device's KV alone (a context set larger
            # than the cache, by a caller of the book): it ends as at the context's end
            seq = self.book.seqs[self.book.kv_full.pop()]
            if seq.home is not None:
                self.executor.release(seq.home, seq.seq_id)
            req = self.requests[seq.seq_id]
            req.finish_reason, req.finish_time = "length", self.clock()
        dropped = self.plans.take_evicted()
        if dropped:
            self.executor.drop_plans(dropped)
        stuck = self.book.unschedulable() if not jobs else None
        if stuck is not None:
            self._finish(self.requests[stuck],
                         "error: the prompt does not fit in the KV cache")
        return jobs

    def job_spec(self, job: Job) -> JobSpec:
        """The executor's view of a job: each unit sequence's new token ids, and how to
        sample each request."""
        tokens = {i: self.requests[c.seq_id].ids(c.start, c.start + c.num_tokens)
                  for i, c in enumerate(job.unit.seqs)}
        sampling = {c.seq_id: _sampling(self.requests[c.seq_id].params)
                    for c in job.unit.seqs if c.logits != "none"}
        return JobSpec(job.job_id, job.plan, tokens, sampling, job.unit, job.plan_id)

    def step(self) -> list[TokenEvent]:
        jobs = self.schedule()
        if not jobs:
            return []
        results = self.executor.run_many([self.job_spec(job) for job in jobs])
        events: list[TokenEvent] = []
        for job, result in zip(jobs, results):
            events.extend(self.complete(job, result))
        return events

    def complete(self, job: Job, result: JobResult) -> list[TokenEvent]:
        """Take the job's result; then, if devices lost their state meanwhile, what they
        held (its requests too, idle by then) runs again or fails (`lose`)."""
        if result.error is not None:
            events = self.fail(job, f"error: {result.error}", retry=result.retry)
        else:
            events = self._took(job, result)
            for chunk in job.unit.seqs if self._stale else ():  # KV lost while it ran
                why = self._stale.pop(chunk.seq_id, None)
                req = self.requests.get(chunk.seq_id)
                if why is not None and req is not None and not req.finished:
                    events.extend(self._again_or_end(req, why))
        for device in result.lost:
            events.extend(self.lose(device))
        return events

    def _took(self, job: Job, result: JobResult) -> list[TokenEvent]:
        """A job that ran: its sampled tokens, stops checked."""
        done = self.book.complete(job)
        self._released(done.released)
        index = {c.seq_id: i for i, c in enumerate(job.unit.seqs)}
        now = self.clock()
        events = []
        for seq_id in done.sampled:
            req = self.requests[seq_id]
            token = result.tokens.get(index[seq_id])
            if token is None:  # this request alone failed (its sampling, say)
                why = result.errors.get(index[seq_id], "no token was sampled")
                self._finish(req, f"error: {why}", now)
                events.append(TokenEvent(seq_id, -1, True, req.finish_reason))
                continue
            req.output_ids.append(token)
            logprobs = result.logprobs.get(index[seq_id])
            if req.params.logprobs is not None and logprobs is not None:
                req.logprobs.append(logprobs)
            self.book.add_output(seq_id)
            if req.first_token_time is None:
                req.first_token_time = now
            try:
                reason = self._stop_reason(req, token)
            except Exception as exc:  # a stop check (decoding, say) fails this request alone
                reason = f"error: checking stops failed: {type(exc).__name__}: {exc}"
            if reason is not None:
                self._finish(req, reason, now)
            events.append(TokenEvent(seq_id, token, reason is not None, reason, logprobs))
        return events

    def fail(self, job: Job, reason: str, retry: bool = False) -> list[TokenEvent]:
        """`job` could not run: end its requests with `reason`; with `retry` (it failed for
        no fault of theirs) each that may runs again instead (see the module docstring)."""
        for chunk in job.unit.seqs:
            self._stale.pop(chunk.seq_id, None)  # its request runs again or ends here
        again = {c.seq_id for c in job.unit.seqs
                 if retry and self._may_retry(c.seq_id, reason)}
        done = self.book.requeue(job, again, reason)
        self._released(done.released)
        now = self.clock()
        events = []
        for chunk in job.unit.seqs:
            req = self.requests.get(chunk.seq_id)
            if chunk.seq_id not in again and req is not None and req.finish_time is None:
                req.finish_reason = _again(reason, req) if retry else reason
                req.finish_time = now
                events.append(TokenEvent(req.request_id, -1, True, req.finish_reason))
        return events

    def _may_retry(self, request_id: int, why: str) -> bool:
        """Whether the request runs again after losing its actor (counted if so)."""
        req = self.requests.get(request_id)
        if req is None or req.finished or req.retries >= MAX_RETRIES:
            return False
        req.retries += 1
        self.num_retries += 1
        log.warning("request %d runs again (%s; retry %d of %d)", request_id,
                    why.removeprefix("error: "), req.retries, MAX_RETRIES)
        return True

    def _released(self, released: list[tuple[str, int]]) -> None:
        for home, seq_id in released:
            self.executor.release(home, seq_id)
            if seq_id in self._zombies:
                self._zombies.discard(seq_id)
                self.book.pop(seq_id)

    def lose(self, device: str) -> list[TokenEvent]:
        """`device` lost its state (its actor restarted): the requests it served, and those
        whose KV cache it kept (a policy's `kv_devices`), run again (recomputed) if they
        may, else fail; one in flight does so once its job is back (a job that finished
        before the loss was noticed may come back after it)."""
        events = []
        kept = self.scheduler.kv_devices(self.spec, self.cluster)
        homes = {device} | {home for home, where in kept.items() if where == device}
        reason = f"error: {device} restarted and lost this request's state"
        for seq in list(self.book):
            if seq.home not in homes or seq.status is not SeqStatus.RUNNING:
                continue
            if seq.in_flight:
                self._stale[seq.seq_id] = reason
                continue
            events.extend(self._again_or_end(self.requests[seq.seq_id], reason))
        return events

    def _again_or_end(self, req: Request, reason: str) -> list[TokenEvent]:
        """An idle running request whose KV an actor lost: it runs again (recomputed) if it
        may, else it ends with `reason`, its KV freed where it was kept."""
        if self._may_retry(req.request_id, reason):
            self.book.preempt(req.request_id)  # its KV is freed with the evicted
            return []
        self._finish(req, _again(reason, req))
        return [TokenEvent(req.request_id, -1, True, req.finish_reason)]

    def _stop_reason(self, req: Request, token: int) -> str | None:
        params = req.params
        if token in params.stop_token_ids:
            return "stop"
        if token in self.eos_ids and not params.ignore_eos:
            return "stop"
        if params.stop and self.tokenizer is not None:
            if req.stop_decoder is None:
                req.stop_decoder = IncrementalDecoder(self.tokenizer)
            new = req.stop_decoder.step(req.output_ids)
            # with the complete characters held back before an incomplete one: the token
            # that completes a stop string may begin the next character
            held = req.stop_decoder.held
            if new or held:  # only the new text, and the tail a stop could begin in
                window = req.stop_tail + new + held
                found = [h for s in params.stop if (h := window.find(s)) >= 0]
                if found:
                    req.stop_pieces += (new, held)
                    req.stop_text_end = req.stop_len - len(req.stop_tail) + min(found)
                    return "stop"
            if new:
                req.stop_pieces.append(new)
                req.stop_len += len(new)
                keep = max(len(s) for s in params.stop) - 1
                req.stop_tail = (req.stop_tail + new)[-keep:] if keep else ""
        if len(req.output_ids) >= params.max_new_tokens:
            return "length"
        if req.num_ids >= self.context:
            return "length"
        return None

    def _finish(self, req: Request, reason: str, now: float | None = None) -> None:
        seq: Seq = self.book.seqs[req.request_id]
        home = seq.home
        if self.book.finish(req.request_id, reason) and home is not None:
            self.executor.release(home, req.request_id)
        req.finish_reason = reason
        req.finish_time = self.clock() if now is None else now

    def is_running(self, request_id: int) -> bool:
        return self.book.seqs[request_id].status is SeqStatus.RUNNING

    def text_of(self, req: Request) -> str:
        if self.tokenizer is None:
            return ""
        if req.stop_text_end is not None:  # the text the stop was found in, up to it
            return req.stop_text[:req.stop_text_end]
        return self.tokenizer.decode(req.output_ids)


def _sampling(params: SamplingParams) -> dict[str, object]:
    """The sampling fields an actor needs to draw a request's tokens."""
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "seed": params.seed, "logprobs": params.logprobs}
