"""AsyncEngine: the Python async API.

    async with moeflow.AsyncEngine.from_pretrained(path, scheduler="fine-ep",
                                                   devices="cpu:0,cpu:1") as engine:
        async for event in engine.generate("Once upon a time",
                                           SamplingParams(max_new_tokens=32)):
            if isinstance(event, TokenEvent):
                print(event.text, end="")
            else:  # FinalEvent: finish reason, usage, timings
                print(event.finish_reason, event.usage, event.timings)

Requests join and leave between steps (continuous batching). Breaking out of the loop, or
cancelling the task iterating it, aborts the request and frees its KV cache.

One engine thread owns the EngineCore and the executor and does every piece of torch work
(loading weights included): the event loop only queues commands and hands out events.
(Torch's CPU kernels run on OpenMP thread teams, one per calling thread; keeping all of it
on one thread keeps the weight-streaming speed.) A full admission queue answers
OverloadedError instead of growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from moeflow.serve.build import build_engine_core, resolve_dtype
from moeflow.serve.metrics import Metrics
from moeflow.serve.sampling import SamplingParams

log = logging.getLogger("moeflow.engine")
MAX_RESTARTS = 3  # engine restarts allowed within RESTART_WINDOW_S before it gives up
RESTART_WINDOW_S = 60.0
STOP_TIMEOUT_S = 60.0  # closing the executor stops actor processes: bounded, but not instant
Prompt = Union[str, Sequence[int]]


class OverloadedError(RuntimeError):
    """The admission queue is full; try again later."""


class EngineStopped(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token and the text it completes (possibly empty mid-character)."""

    request_id: int
    index: int
    token_id: int
    text: str


@dataclass(frozen=True, slots=True)
class FinalEvent:
    request_id: int
    finish_reason: str  # "length", "stop", "abort", or "error: ..."
    token_ids: tuple[int, ...]
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tpot_s: float
    e2e_s: float

    @property
    def error(self) -> str | None:
        return self.finish_reason if self.finish_reason.startswith("error") else None

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    @property
    def timings(self) -> dict[str, float]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}


Event = Union[TokenEvent, FinalEvent]


@dataclass(frozen=True)
class EngineConfig:
    model: str
    scheduler: Any = "batch-ep"
    devices: Any = "cpu:0"
    dtype: str = "auto"
    transport: str = "inproc"
    kv_cache_tokens: int = 65536
    max_batch_tokens: int = 2048
    max_seqs: int = 64
    max_waiting: int = 1024  # requests admitted but not finished, beyond which: overloaded
    record_routing: bool = False
    faults: str = ""  # chaos testing: drop/delay actor data messages (moeflow.actors.plane)


class _Detokenizer:
    """Incremental detokenization: each call returns the new text, holding back bytes of a
    character that is not complete yet."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.prefix = 0
        self.read = 0

    def step(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        prefix_text = self.tokenizer.decode(ids[self.prefix:self.read])
        new_text = self.tokenizer.decode(ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(ids)
            return new_text[len(prefix_text):]
        return ""


@dataclass
class _Stream:
    """The event loop's end of one request."""

    events: asyncio.Queue[Event | BaseException] = field(default_factory=asyncio.Queue)


class _EngineThread(threading.Thread):
    """Owns the EngineCore. Supervised: if a step raises anyway (a bug, an executor that
    failed), the requests in progress fail with a clear error, the core and its executor
    are rebuilt, and serving goes on; after MAX_RESTARTS within RESTART_WINDOW_S it gives
    up, and `fatal` says why."""

    def __init__(self, config: EngineConfig, loop: asyncio.AbstractEventLoop,
                 deliver: Any, metrics: Metrics, on_exit: Any) -> None:
        super().__init__(name="moeflow-engine", daemon=True)
        self.config = config
        self.loop = loop
        self.deliver = deliver  # called in the loop with [(request_id, event)]
        self.metrics = metrics
        self.on_exit = on_exit  # called in the loop once this thread has stopped
        self.commands: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self.ready: asyncio.Future[Any] = loop.create_future()
        self.core: Any = None
        self.detok: dict[int, _Detokenizer] = {}
        self.restarts: list[float] = []  # monotonic times of restarts
        self.last_error: str | None = None
        self.fatal: str | None = None
        self.exited = False  # set in the loop by AsyncEngine once this thread has stopped

    # called from the event loop
    def submit(self, command: str, payload: Any = None) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.commands.put((command, payload, future))
        return future

    def _resolve(self, future: asyncio.Future[Any] | None, value: Any = None,
                 error: BaseException | None = None) -> None:
        if future is None:
            return

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

        self._in_loop(settle)

    def _in_loop(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(fn, *args)

    def run(self) -> None:
        try:
            self._build()
        except BaseException as exc:
            self._resolve(self.ready, error=exc)
            self._in_loop(self.on_exit)
            return
        self._resolve(self.ready, self.core)
        try:
            while not self._serve():
                pass
        finally:
            self._close_core()
            self._in_loop(self.on_exit)

    def _serve(self) -> bool:
        """Serve until told to stop (True), or until a failure was handled (False: serve
        again on a rebuilt core)."""
        in_flight: dict[int, Any] = {}
        try:
            while True:
                idle = not in_flight and not self.core.has_unfinished()
                if not self._drain(block=idle):
                    return True
                if idle:
                    self._watch()
                for job in self.core.schedule():
                    in_flight[job.job_id] = job
                    self.core.executor.submit(self.core.job_spec(job))
                self._flush_failures()
                if in_flight:
                    for result in self.core.executor.poll(timeout=0.02):
                        job = in_flight.pop(result.job_id)
                        self._publish(self.core.complete(job, result))
                self.metrics.gauge(waiting=len(self.core.book.waiting),
                                   running=len(self.core.book.running))
        except Exception as exc:
            log.exception("the engine failed")
            return not self._recover(exc)

    def _recover(self, exc: Exception) -> bool:
        """Fail every request in progress, rebuild the core; False when giving up."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._abandon(f"error: the engine failed ({self.last_error}) and restarted")
        self._close_core()
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            self.fatal = (f"the engine failed {len(self.restarts)} times within "
                          f"{RESTART_WINDOW_S:.0f}s; last: {self.last_error}")
            log.error("%s; giving up", self.fatal)
            return False
        try:
            self._build()
        except Exception as build_error:
            self.fatal = f"the engine could not restart: {build_error}"
            log.exception("the engine could not restart")
            return False
        log.warning("the engine restarted (%d within %.0fs)", len(self.restarts),
                    RESTART_WINDOW_S)
        return True

    def _abandon(self, reason: str) -> None:
        """End every admitted request with `reason`, without trusting the core's state."""
        out = []
        for rid in list(self.detok):
            req = None if self.core is None else self.core.requests.get(rid)
            ids = tuple(req.output_ids) if req is not None else ()
            prompt = len(req.prompt_ids) if req is not None else 0
            final = FinalEvent(rid, reason, ids, "", prompt, len(ids), 0.0, 0.0, 0.0)
            self.metrics.request_finished(final)
            out.append((rid, final))
        self.detok.clear()
        if out:
            self._in_loop(self.deliver, out)

    def _close_core(self) -> None:
        if self.core is None:
            return
        core, self.core = self.core, None
        try:
            core.executor.close()
        except Exception:
            log.exception("closing the executor failed")

    def _watch(self) -> None:
        """Idle: let the executor check its actors, failing what a lost device held."""
        lost = self.core.executor.watch()
        for device in lost:
            self._publish(self.core.lose(device))
        self._flush_failures()

    def _build(self) -> None:
        c = self.config
        self.core = build_engine_core(c.model, c.devices, c.dtype, c.scheduler,
                                      transport=c.transport, kv_cache_tokens=c.kv_cache_tokens,
                                      max_batch_tokens=c.max_batch_tokens, max_seqs=c.max_seqs,
                                      record_routing=c.record_routing, faults=c.faults)
        self.dtype = resolve_dtype(c.dtype, self.core.spec.dtype)

    def _drain(self, block: bool) -> bool:
        """Run queued commands; False once told to stop."""
        while True:
            try:
                command, payload, future = (self.commands.get(timeout=0.5) if block
                                            else self.commands.get_nowait())
            except queue.Empty:
                return True
            block = False
            if command == "stop":
                self._fail_all("abort")
                self._resolve(future)
                return False
            if command == "add":
                prompt_ids, params, request_id = payload
                try:
                    if self.core.num_unfinished >= self.config.max_waiting:
                        raise OverloadedError(
                            f"{self.core.num_unfinished} requests are in progress "
                            f"(the limit is {self.config.max_waiting})")
                    req = self.core.add_request(prompt_ids, params, request_id)
                except Exception as exc:
                    self._resolve(future, error=exc)
                    continue
                self.detok[req.request_id] = _Detokenizer(self.core.tokenizer)
                self.metrics.request_started(len(prompt_ids))
                self._resolve(future, req.request_id)
            elif command == "abort":
                if payload in self.core.requests:
                    self.core.abort(payload)
                    self._finalize(payload)
                self._resolve(future)
            elif command == "call":
                try:
                    self._resolve(future, payload(self.core))
                except Exception as exc:
                    self._resolve(future, error=exc)

    def _publish(self, token_events: list[Any]) -> None:
        out = []
        for ev in token_events:
            req = self.core.requests.get(ev.request_id)
            if req is None:
                continue
            if ev.token_id >= 0:
                try:
                    text = self.detok[ev.request_id].step(req.output_ids)
                except Exception as exc:  # this request's text fails it alone
                    log.warning("request %d: detokenizing failed: %r", ev.request_id, exc)
                    self.core.abort(ev.request_id, f"error: detokenizing failed: "
                                                   f"{type(exc).__name__}: {exc}")
                    text = ""
                out.append((ev.request_id, TokenEvent(ev.request_id, len(req.output_ids) - 1,
                                                      ev.token_id, text)))
                self.metrics.token()
            if ev.finished or req.finished:
                final = self._finalize(ev.request_id)
                if final is not None:
                    out.append((ev.request_id, final))
        if out:
            self.loop.call_soon_threadsafe(self.deliver, out)

    def _flush_failures(self) -> None:
        """Requests finished outside a job (unschedulable, lost): publish their finals."""
        done = [rid for rid, req in self.core.requests.items()
                if req.finished and rid in self.detok]
        out = [(rid, f) for rid in done if (f := self._finalize(rid)) is not None]
        if out:
            self.loop.call_soon_threadsafe(self.deliver, out)

    def _finalize(self, request_id: int) -> FinalEvent | None:
        req = self.core.requests.get(request_id)
        if req is None or not req.finished:
            return None
        self.core.pop_finished(request_id)
        self.detok.pop(request_id, None)
        first = req.first_token_time or req.finish_time or req.arrival
        end = req.finish_time or first
        n = len(req.output_ids)
        try:
            text = self.core.text_of(req)
        except Exception as exc:  # the request is over: its text alone is lost
            log.warning("request %d: detokenizing failed: %r", request_id, exc)
            text = ""
        final = FinalEvent(request_id, req.finish_reason or "abort", tuple(req.output_ids),
                           text, len(req.prompt_ids), n, first - req.arrival,
                           (end - first) / (n - 1) if n > 1 else 0.0, end - req.arrival)
        self.metrics.request_finished(final)
        return final

    def _fail_all(self, reason: str) -> None:
        if self.core is None:
            return
        for rid in list(self.core.requests):
            self.core.abort(rid, reason)
        self._flush_failures()


def _settled(future: asyncio.Future[Any]) -> None:
    """For a command nobody waits on: its outcome (an engine that stopped) is moot."""
    if not future.cancelled():
        future.exception()


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self._thread: _EngineThread | None = None
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count()
        self.spec: Any = None
        self.tokenizer: Any = None
        self._stopped = asyncio.Event()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, scheduler: Any = "batch-ep",
                        devices: str | Sequence[str] = "cpu:0", dtype: str = "auto",
                        transport: str = "inproc", **options: Any) -> AsyncEngine:
        return cls(EngineConfig(str(path), scheduler, devices, dtype, transport, **options))

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> AsyncEngine:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._thread = _EngineThread(self.config, loop, self._deliver, self.metrics,
                                     self._on_exit)
        self._thread.start()
        core = await self._thread.ready
        self.spec, self.tokenizer = core.spec, core.tokenizer
        return self

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if thread.is_alive() and not thread.exited:
            with contextlib.suppress(EngineStopped, TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await thread.submit("stop")
        await asyncio.to_thread(thread.join, STOP_TIMEOUT_S)
        for stream in self._streams.values():
            stream.events.put_nowait(EngineStopped("the engine stopped"))

    def _on_exit(self) -> None:
        """In the loop, once the engine thread has stopped (told to, or given up): nothing
        waits for it any more."""
        thread = self._thread
        if thread is None:
            return
        thread.exited = True
        error = EngineStopped(f"the engine stopped: {thread.fatal}" if thread.fatal
                              else "the engine stopped")
        while True:  # commands it will never read
            try:
                _, _, future = thread.commands.get_nowait()
            except queue.Empty:
                break
            if future is not None and not future.done():
                future.set_exception(error)
        for stream in self._streams.values():
            stream.events.put_nowait(error)
        self._stopped.set()

    async def wait_stopped(self) -> str | None:
        """Wait until the engine thread stops; returns why, if it gave up after failures."""
        await self._stopped.wait()
        return None if self._thread is None else self._thread.fatal

    def health(self) -> dict[str, Any]:
        """"ok" (restarts and the last failure, if any), or "failed" with the reason."""
        thread = self._thread
        if thread is None or thread.exited:
            return {"status": "failed", "restarts": 0 if thread is None else
                    len(thread.restarts), "last_error": None if thread is None else
                    thread.fatal or thread.last_error}
        now = time.monotonic()
        return {"status": "ok",
                "restarts": sum(1 for t in thread.restarts if now - t < RESTART_WINDOW_S),
                "last_error": thread.last_error}

    async def __aenter__(self) -> AsyncEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- requests ------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model} has no tokenizer.json, so text prompts "
                                 f"cannot be encoded; pass token ids instead")
            return list(self.tokenizer.encode(prompt))
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"a token-id prompt must be a sequence of ints, got {ids[:8]!r}")
        return ids

    async def add(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Admit a request; returns its id. Its events come from `events(id)`."""
        thread = self._running()
        # tokenizing a long text takes a while: off the event loop, which serves everyone
        ids = (await asyncio.to_thread(self.encode, prompt) if isinstance(prompt, str)
               else self.encode(prompt))
        thread = self._running()
        request_id = next(self._ids)
        self._streams[request_id] = _Stream()
        try:
            await thread.submit("add", (ids, params or SamplingParams(), request_id))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return request_id

    async def events(self, request_id: int) -> AsyncIterator[Event]:
        stream = self._streams[request_id]
        finished = False
        try:
            while True:
                event = await stream.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, FinalEvent):
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._thread is not None and not self._thread.exited:
                # the consumer went away: abort the request and free its KV
                self._thread.submit("abort", request_id).add_done_callback(_settled)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None
                       ) -> AsyncIterator[Event]:
        """Stream a request's TokenEvents, then its FinalEvent."""
        request_id = await self.add(prompt, params)
        async for event in self.events(request_id):
            yield event

    async def abort(self, request_id: int) -> None:
        if self._thread is not None and not self._thread.exited:
            await self._thread.submit("abort", request_id)

    async def call(self, fn: Any) -> Any:
        """Run `fn(engine_core)` on the engine thread (inspection, tests)."""
        return await self._running().submit("call", fn)

    def _running(self) -> _EngineThread:
        if self._thread is None or self._thread.exited or not self._thread.is_alive():
            raise EngineStopped("the engine is not running (use `async with` or start())")
        return self._thread

    def _deliver(self, batch: list[tuple[int, Event]]) -> None:
        for request_id, event in batch:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.events.put_nowait(event)

    @property
    def num_active(self) -> int:
        return len(self._streams)
