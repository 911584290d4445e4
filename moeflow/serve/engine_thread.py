"""The engine thread: the one thread that owns an EngineCore, its executor and every piece
of torch work (loading weights included), driven by commands from an event loop.

It is supervised: if a step raises anyway (a bug, an executor that failed), the requests
in progress fail with a clear error, the core and its executor are rebuilt, and serving
goes on; after MAX_RESTARTS within RESTART_WINDOW_S it gives up, and `fatal` says why.
Per request, detokenizing runs under an error boundary: it fails that request alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from typing import Any

from moeflow.models.tokenizer import IncrementalDecoder
from moeflow.serve.build import build_engine_core, resolve_dtype
from moeflow.serve.config import EngineConfig
from moeflow.serve.events import FinalEvent, OverloadedError, TokenEvent
from moeflow.serve.metrics import Metrics

log = logging.getLogger("moeflow.engine")
MAX_RESTARTS = 3  # engine restarts allowed within RESTART_WINDOW_S before it gives up
RESTART_WINDOW_S = 60.0


class EngineThread(threading.Thread):
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
        self.detok: dict[int, IncrementalDecoder | None] = {}  # None: not streamed
        self.restarts: list[float] = []  # monotonic times of restarts
        self.builds = 0  # cores built: a trace after a restart goes to a file of its own
        self.last_error: str | None = None
        self.fatal: str | None = None
        self.exited = False  # set in the loop by AsyncEngine once this thread has stopped
        self._recomputed = (0, 0)  # the core's preemptions and retries handed to metrics

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
                self._count_recomputed()
        except Exception as exc:
            log.exception("the engine failed")
            return not self._recover(exc)

    def _count_recomputed(self) -> None:
        """Hand the core's new preemptions and retries to the metrics."""
        core = self.core
        preempted, retried = core.book.num_preemptions, core.num_retries
        if (preempted, retried) != self._recomputed:
            self.metrics.recomputed(preempted - self._recomputed[0],
                                    retried - self._recomputed[1])
            self._recomputed = (preempted, retried)

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
        config = self.config
        if config.trace is not None and self.builds:  # keep the trace up to the failure
            stem, _, suffix = config.trace.rpartition(".")
            config = dataclasses.replace(config, trace=f"{stem}.restart{self.builds}.{suffix}")
        self.builds += 1
        self.core = build_engine_core(config)
        self._recomputed = (0, 0)
        self.dtype = resolve_dtype(self.config.dtype, self.core.spec.dtype)

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
                prompt_ids, params, request_id, stream = payload
                try:
                    if self.core.num_unfinished >= self.config.max_waiting:
                        raise OverloadedError(
                            f"{self.core.num_unfinished} requests are in progress "
                            f"(the limit is {self.config.max_waiting})")
                    req = self.core.add_request(prompt_ids, params, request_id)
                except Exception as exc:
                    self._resolve(future, error=exc)
                    continue
                # None: the request's tokens are not published, only its final event
                self.detok[req.request_id] = (IncrementalDecoder(self.core.tokenizer) if stream
                                              else None)
                self.metrics.request_started(len(prompt_ids))
                self._resolve(future, req.request_id)
            elif command == "abort":
                if payload in self.core.requests:
                    self.core.abort(payload)
                    final = self._finalize(payload)
                    if final is not None:
                        self._in_loop(self.deliver, [(payload, final)])
                self._resolve(future)
            elif command == "call":
                try:
                    self._resolve(future, payload(self.core))
                except Exception as exc:
                    self._resolve(future, error=exc)

    def _publish(self, token_events: list[Any]) -> None:
        out: list[tuple[int, Any]] = []
        for ev in token_events:
            req = self.core.requests.get(ev.request_id)
            if req is None:
                continue
            detok = self.detok.get(ev.request_id)
            if ev.token_id >= 0:
                self.metrics.token()
            if ev.token_id >= 0 and detok is not None:  # streamed: a TokenEvent
                try:
                    text = detok.step(req.output_ids)
                except Exception as exc:  # this request's text fails it alone
                    log.warning("request %d: detokenizing failed: %r", ev.request_id, exc)
                    self.core.abort(ev.request_id, f"error: detokenizing failed: "
                                                   f"{type(exc).__name__}: {exc}")
                    text = ""
                out.append((ev.request_id, TokenEvent(ev.request_id, len(req.output_ids) - 1,
                                                      ev.token_id, text,
                                                      ev.finished or req.finished,
                                                      ev.logprobs)))
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
                           (end - first) / (n - 1) if n > 1 else 0.0, end - req.arrival,
                           tuple(req.logprobs) if req.params.logprobs is not None else None)
        self.metrics.request_finished(final)
        return final

    def _fail_all(self, reason: str) -> None:
        if self.core is None:
            return
        for rid in list(self.core.requests):
            self.core.abort(rid, reason)
        self._flush_failures()
