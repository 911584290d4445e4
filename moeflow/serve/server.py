"""RequestServer: the request protocol (moeflow/serve/protocol.py) over a ZeroMQ ROUTER,
and the OpenAI-compatible HTTP API (moeflow/serve/http.py), either or both, in front of one
AsyncEngine.

One asyncio.TaskGroup owns everything that runs: the receive loop, one task per generate
(admit, stream its events back, send its final), one per health query, and the HTTP
endpoints (uvicorn, moeflow/serve/asgi.py): the OpenAI front end and `--metrics-port`'s
Prometheus text. The receive loop never waits on the engine,
so an abort or a health query is read while generations stream. An abort cancels its
request's task; leaving the engine's event stream aborts the request there and frees its KV
cache. A bad request gets an error reply and the server goes on. Work that grows with a
request's size runs in worker threads (decoding a large frame, tokenizing a text prompt),
so one big request does not stall the other clients' streams.

Shutdown (SIGINT, SIGTERM or stop()): stop reading, end every generation in progress with a
final whose finish_reason is "abort", stop the engine (its actor processes exit), close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, cast

import zmq
import zmq.asyncio

from moeflow.ops.sampling import SamplingParams
from moeflow.serve import protocol as p
from moeflow.serve.async_engine import AsyncEngine
from moeflow.serve.events import EngineStopped, Event, FinalEvent, OverloadedError, TokenEvent
from moeflow.serve.config import EngineConfig
from moeflow.serve.asgi import HttpEndpoint, metrics_app
from moeflow.serve.http import OpenAIFrontEnd
from moeflow.serve.security import CurveConfig, check_bind, secure

log = logging.getLogger("moeflow.server")

HEALTH_TIMEOUT_S = 5.0  # the engine thread answers between steps
REPLY_TIMEOUT_S = 1.0  # replies sent by the receive loop itself: it must not stall
MAX_HEALTH_REPLIES = 256  # health queries answered at once; more are `overloaded`
MAX_MESSAGE_BYTES = 8 << 20  # a peer sending more is disconnected by zmq
INLINE_PARSE_BYTES = 64 << 10  # larger frames are decoded and checked in a worker thread
PROMPT_BYTES_PER_TOKEN = 16  # the default text limit: ~4x the bytes of an average token


class _LogBudget:
    """At most `per_minute` log lines a minute for one kind of event; the rest are counted
    and reported as one line when the next minute allows lines again."""

    def __init__(self, what: str, per_minute: int = 60) -> None:
        self.what, self.per_minute = what, per_minute
        self.window, self.used, self.suppressed = 0.0, 0, 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self.window >= 60.0:
            if self.suppressed:
                log.info("%d more %s were not logged in the last minute", self.suppressed,
                         self.what)
            self.window, self.used, self.suppressed = now, 0, 0
        if self.used < self.per_minute:
            self.used += 1
            return True
        self.suppressed += 1
        return False


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything `moeflow serve` takes. Checks itself (addresses, limits); no I/O.

    `max_prompt_bytes` bounds a text prompt's UTF-8 bytes before it is tokenized. Its
    default, PROMPT_BYTES_PER_TOKEN bytes per prompt token allowed (at most
    MAX_MESSAGE_BYTES, the largest frame), refuses only texts whose tokens would average
    over 16 bytes; tokenizers average about 4, so such a text is nearly always over the
    token limit as well, and is refused without tokenizing it."""

    engine: EngineConfig
    bind: str | None = "tcp://127.0.0.1:5555"  # None: HTTP only
    max_prompt_tokens: int | None = None  # None: the engine's context - 1 (the model's, or
    # less where a device's KV cache holds less)
    max_prompt_bytes: int | None = None  # None: 16 per prompt token, at most 8 MiB
    max_new_tokens_limit: int = p.DEFAULT_MAX_NEW_TOKENS_LIMIT
    metrics_port: int | None = None
    curve: CurveConfig | None = None
    send_timeout_s: float = 30.0  # a client that takes no reply for this long is gone
    http: str | None = None  # HOST:PORT of the OpenAI-compatible front end (moeflow.serve.http)
    api_key: str | None = None  # required by HTTP calls when set; needed off loopback
    chat_template: str | None = None  # a file overriding the checkpoint's chat template
    served_model_name: str | None = None  # the HTTP "model"; default: engine.model as given
    # without an API key, Host names HTTP calls may give beside the loopback's (a local
    # reverse proxy that forwards its public one)
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.allowed_hosts:  # a host name, not a URL (http://x allowed "http")
            if not name or any(c in name for c in "/@ \t") or name.count(":") > 1:
                raise ValueError(f"--allowed-host {name!r}: expected a host name such as "
                                 f"api.example.com")
        if self.bind is None and self.http is None:
            raise ValueError("nothing to serve: give a ZeroMQ bind address, an HTTP address, "
                             "or both")
        if self.bind is not None:
            check_bind(self.bind, curve=self.curve is not None)
        if self.http is not None:
            from moeflow.serve.http import check_http_bind

            check_http_bind(self.http, self.api_key)
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key must not be empty")
        if self.max_new_tokens_limit < 1:
            raise ValueError(f"max_new_tokens_limit must be >= 1, got "
                             f"{self.max_new_tokens_limit}")
        for name in ("max_prompt_tokens", "max_prompt_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.send_timeout_s <= 0:
            raise ValueError(f"send_timeout_s must be > 0, got {self.send_timeout_s}")


@dataclass(eq=False)
class _Job:
    """The server's side of one generate in progress, shared by the receive loop (which may
    abort it) and the task that serves it."""

    client: bytes
    envelope: list[bytes]
    request: p.Generate
    task: asyncio.Task[None] | None = None
    admitted: bool = False
    abort_reason: str | None = None  # "client" (an abort request) or "shutdown"
    aborts: int = 0  # abort requests received for it: each is answered with one `aborted`

    @property
    def key(self) -> tuple[bytes, p.RequestId]:
        return self.client, self.request.id


def _scheduler_name(scheduler: Any) -> str:
    return scheduler if isinstance(scheduler, str) else (getattr(scheduler, "name", "")
                                                         or type(scheduler).__name__)


class _ClientGone(Exception):
    pass


class EngineFailed(RuntimeError):
    """The engine gave up; the server stopped (and `moeflow serve` exits non-zero)."""


class RequestServer:
    """Serves one AsyncEngine on one ROUTER socket; `await serve()` runs until stop()."""

    def __init__(self, config: ServerConfig, engine: AsyncEngine | None = None) -> None:
        self.config = config
        self.engine = engine or AsyncEngine(config.engine)
        self.limits = p.Limits(config.max_new_tokens_limit)
        self.address = config.bind  # the bound endpoint once serving (a "*" port resolved)
        self.metrics_address: str | None = None
        self.http: OpenAIFrontEnd | None = None
        self.http_address: str | None = None  # http://HOST:PORT once serving
        self.started = time.time()
        self.jobs: dict[tuple[bytes, p.RequestId], _Job] = {}
        self._stopping = asyncio.Event()
        self.failure: str | None = None  # why the engine gave up, if it did
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: asyncio.TaskGroup | None = None
        # the engine's (waiting, running), asked once for every health query meanwhile
        self._engine_counts: asyncio.Task[tuple[int, int]] | None = None
        self._health_replies = 0  # health replies being prepared
        self._refusals = _LogBudget("refused messages")

    def stop(self) -> None:
        """Begin a graceful shutdown (call in the server's event loop)."""
        self._stopping.set()

    async def serve(self, ready: Callable[[RequestServer], None] | None = None) -> None:
        """Load the model, bind, serve until stop(); then shut down in order."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        context = zmq.asyncio.Context()
        auth: Any = None
        metrics: HttpEndpoint | None = None
        try:
            async with self.engine:
                self._set_limits()
                if self.config.bind is not None:
                    auth = self._bind(context, self.config.bind)
                if self.config.http is not None:  # bound before the group: a busy port
                    self.http = OpenAIFrontEnd(  # fails plainly
                        self, self.config.http, api_key=self.config.api_key,
                        allowed_hosts=self.config.allowed_hosts,
                        chat_template=self.config.chat_template,
                        served_model_name=self.config.served_model_name)
                    self.http.start()
                    self.http_address = self.http.address
                if self.config.metrics_port is not None:  # Prometheus alone, on loopback
                    metrics = HttpEndpoint(metrics_app(self.engine.metrics), "127.0.0.1",
                                           self.config.metrics_port)
                    self.metrics_address = metrics.start() + "/metrics"
                async with asyncio.TaskGroup() as tasks:
                    self._tasks = tasks
                    receiver = (tasks.create_task(self._receive())
                                if self._socket is not None else None)
                    watcher = tasks.create_task(self._watch_engine())
                    if self.http is not None:
                        tasks.create_task(self.http.run())
                    if metrics is not None:
                        tasks.create_task(metrics.run())
                    if ready is not None and not self._stopping.is_set():
                        ready(self)
                    await self._stopping.wait()
                    log.info("shutting down: %d requests in progress",
                             len(self.jobs) + (len(self.http.calls) if self.http else 0))
                    if receiver is not None:
                        receiver.cancel()
                    watcher.cancel()
                    if metrics is not None:
                        metrics.stop()
                    if self.http is not None:
                        self.http.shutdown()
                    for job in list(self.jobs.values()):
                        job.abort_reason = job.abort_reason or "shutdown"
                        if job.task is not None:
                            job.task.cancel()
        finally:
            if metrics is not None:
                metrics.close()
            if self.http is not None:
                self.http.close()
            if self._socket is not None:
                self._socket.close(linger=0)
            if auth is not None:
                auth.stop()
            context.term()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if self.failure is not None:
            raise EngineFailed(self.failure)

    def _bind(self, context: zmq.asyncio.Context, address: str) -> Any:
        """The ROUTER socket on `address`; returns the CURVE authenticator, if any."""
        self._socket = socket = context.socket(zmq.ROUTER)
        socket.linger = 0
        socket.router_mandatory = 1  # a reply to a client that left raises
        socket.sndhwm = 100_000
        socket.maxmsgsize = MAX_MESSAGE_BYTES
        auth = None
        if self.config.curve is not None:
            auth = secure(socket, context, self.config.curve)
        try:
            socket.bind(address)
        except zmq.ZMQError as exc:
            raise ValueError(f"cannot bind {address}: {exc}") from None
        self.address = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return auth

    async def _watch_engine(self) -> None:
        """An engine that gave up (it failed again and again, or could not restart) stops
        the server, which then exits non-zero: a process supervisor restarts it, instead of
        a server that stays up answering every request with failure."""
        why = await self.engine.wait_stopped()
        if not self._stopping.is_set():
            self.failure = why or "the engine stopped"
            log.error("the engine stopped: %s; shutting down", self.failure)
            self.stop()

    def _set_limits(self) -> None:
        spec = self.engine.spec
        most = self.engine.context - 1  # the prompt needs room for one token
        asked = self.config.max_prompt_tokens
        if asked is not None and asked > most:
            holds = ("max_position_embeddings - 1"
                     if self.engine.context == spec.max_position_embeddings else
                     "a device's KV cache, --kv-cache-tokens, less 1")
            raise ValueError(f"--max-prompt-tokens {asked} is more than {spec.name or 'the model'}"
                             f" holds ({most}: {holds})")
        num_tokens = asked or most
        num_bytes = self.config.max_prompt_bytes or min(num_tokens * PROMPT_BYTES_PER_TOKEN,
                                                        MAX_MESSAGE_BYTES)
        self.limits = p.Limits(self.config.max_new_tokens_limit, num_tokens, spec.vocab_size,
                               num_bytes)

    # -- receiving -----------------------------------------------------------------

    async def _receive(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            client, rest = frames[0], frames[1:]
            envelope: list[bytes] = [b""] if rest and rest[0] == b"" else []
            try:
                envelope, body = p.split_frames(rest)
                if len(body) > INLINE_PARSE_BYTES:
                    request = await asyncio.to_thread(self._parse, body)
                else:
                    request = self._parse(body)
                await self._dispatch(client, envelope, request)
            except p.ProtocolError as exc:
                if self._refusals.allow():  # a flood of bad messages is not a flood of logs
                    log.info("client %s: %s: %s", client.hex(), exc.code, exc.message)
                if (client, exc.request_id) in self.jobs:  # that request goes on
                    exc = p.detached(exc)
                self.engine.metrics.rejected(exc.code)
                await self._send(client, envelope, p.ErrorReply.of(exc), REPLY_TIMEOUT_S)
            except Exception as exc:  # a bug must not take the server down
                log.exception("client %s: failed to handle a message", client.hex())
                self.engine.metrics.rejected(p.INTERNAL)
                await self._send(client, envelope, p.ErrorReply(None, p.INTERNAL, str(exc)),
                                 REPLY_TIMEOUT_S)

    def _parse(self, body: bytes) -> p.Request:
        return p.parse_request(p.decode(body), self.limits)

    async def _dispatch(self, client: bytes, envelope: list[bytes], request: p.Request) -> None:
        assert self._tasks is not None
        if isinstance(request, p.Generate):
            job = _Job(client, envelope, request)
            if job.key in self.jobs:  # nil id: the error does not end the request in progress
                raise p.ProtocolError(p.DUPLICATE_ID, f"id {request.id!r} is already in "
                                                      f"progress", None, "id")
            p.check_deadline(request, time.time())  # sent long ago (queued while we were down)
            if len(self.jobs) >= self.config.engine.max_waiting:  # the engine would refuse
                # it too: refused here, a flood of generates costs no task, no tokenizing
                raise p.ProtocolError(p.OVERLOADED, f"the server is full: "
                                                    f"{len(self.jobs)} requests are in "
                                                    f"progress (the limit is "
                                                    f"{self.config.engine.max_waiting})",
                                      request.id)
            self.jobs[job.key] = job
            job.task = self._tasks.create_task(self._generate(job))
        elif isinstance(request, p.Abort):
            target = self.jobs.get((client, request.id))
            if target is None:
                raise p.ProtocolError(p.NOT_FOUND, f"id {request.id!r} is not in progress",
                                      request.id, "id")
            target.abort_reason = "client"
            target.aborts += 1  # a second abort while the first takes effect: one more reply
            if target.admitted and target.task is not None:
                target.task.cancel()
            # not admitted yet: its task sees abort_reason once the engine answers
        elif isinstance(request, p.HealthQuery):
            if self._health_replies >= MAX_HEALTH_REPLIES:  # a flood of health queries
                raise p.ProtocolError(p.OVERLOADED, f"{self._health_replies} health queries "
                                                    f"are being answered; retry later",
                                      request.id)
            self._health_replies += 1
            self._tasks.create_task(self._health(client, envelope, request.id))
        else:
            await self._send(client, envelope,
                             p.MetricsReport(self.engine.metrics.snapshot(), request.id),
                             REPLY_TIMEOUT_S)

    # -- one generate --------------------------------------------------------------

    async def _generate(self, job: _Job) -> None:
        request, started = job.request, time.perf_counter()
        terminal: p.Final | p.ErrorReply | None
        try:
            prompt_ids = await self._prompt_ids(request)
            p.check_deadline(request, time.time())  # again: tokenizing takes a while
            engine_id = await self.engine.add(prompt_ids,
                                              SamplingParams(**request.sampling()))
        except p.ProtocolError as exc:
            terminal = p.ErrorReply.of(exc)
        except OverloadedError as exc:
            terminal = p.ErrorReply(request.id, p.OVERLOADED, f"the server is full: {exc}")
        except (ValueError, TypeError) as exc:
            terminal = p.ErrorReply(request.id, p.INVALID_REQUEST, f"prompt: {exc}")
        except asyncio.CancelledError:  # only shutdown cancels a request being admitted
            if job.abort_reason is None:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            terminal = p.ErrorReply(request.id, p.INTERNAL, "the server is shutting down")
        except Exception as exc:
            log.exception("request %r: admission failed", request.id)
            terminal = p.ErrorReply(request.id, p.INTERNAL, f"admission failed: {exc}")
        else:
            job.admitted = True
            if job.abort_reason is not None:
                # aborted while being admitted: the cancellation lands in the stream below,
                # which then aborts the request and frees its KV like any other abort
                asyncio.current_task().cancel()  # type: ignore[union-attr]
            try:
                terminal = await self._stream(job, engine_id, len(prompt_ids), started)
            except _ClientGone:
                terminal = None
            except EngineStopped as exc:
                terminal = p.ErrorReply(request.id, p.INTERNAL, str(exc))
        if isinstance(terminal, p.ErrorReply):
            self.engine.metrics.rejected(terminal.code)
        await self._finish(job, terminal)

    async def _prompt_ids(self, request: p.Generate) -> list[int]:
        if request.prompt_ids is not None:
            return list(request.prompt_ids)  # parse_request checked vocabulary and length
        assert request.prompt is not None  # and parse_request checked its bytes
        if self.engine.tokenizer is None:
            raise p.ProtocolError(p.INVALID_REQUEST, "prompt: this model has no tokenizer; "
                                                     "send prompt_ids", request.id, "prompt")
        ids = await asyncio.to_thread(self.engine.encode, request.prompt)
        if not ids:
            raise p.ProtocolError(p.INVALID_REQUEST, "prompt: the prompt is empty",
                                  request.id, "prompt")
        p.check_prompt_length(len(ids), self.limits, request.id)
        vocab = self.limits.vocab_size
        outside = [t for t in ids if vocab is not None and not 0 <= t < vocab]
        if outside:  # a tokenizer with tokens the model lacks
            raise p.ProtocolError(p.INVALID_REQUEST, f"prompt: the tokenizer gave token ids "
                                                     f"{outside[:5]}, outside the model's "
                                                     f"vocabulary [0, {vocab})", request.id,
                                  "prompt")
        return ids

    async def _stream(self, job: _Job, engine_id: int, num_prompt: int,
                      started: float) -> p.Final:
        """Forward the request's events; its final, or an "abort" final when cancelled."""
        request = job.request
        token_ids: list[int] = []
        texts: list[str] = []
        first: float | None = None
        final: FinalEvent | None = None
        try:
            stream = cast(AsyncGenerator[Event, None], self.engine.events(engine_id))
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        if request.stream and not await self._send(
                                job.client, job.envelope,
                                p.Token(request.id, event.index, event.token_id, event.text),
                                self.config.send_timeout_s):
                            raise _ClientGone()
                        first = first or time.perf_counter()
                        token_ids.append(event.token_id)
                        texts.append(event.text)
                    else:
                        final = event
                        break
        except asyncio.CancelledError:
            if job.abort_reason is None:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        if final is not None:
            return p.Final(request.id, final.finish_reason, final.token_ids, final.text,
                           final.prompt_tokens, final.completion_tokens, final.ttft_s,
                           final.tpot_s, final.e2e_s)
        if job.abort_reason is None:
            raise EngineStopped("the engine ended the request without a final event")
        end = time.perf_counter()
        n = len(token_ids)
        ttft = (first or end) - started
        return p.Final(request.id, "abort", tuple(token_ids), "".join(texts), num_prompt, n,
                       ttft, (end - (first or end)) / (n - 1) if n > 1 else 0.0, end - started)

    async def _finish(self, job: _Job, terminal: p.Final | p.ErrorReply | None) -> None:
        # leaving `jobs` before the first await: an abort from now on is not_found
        self.jobs.pop(job.key, None)
        who = f"client {job.client.hex()} request {job.request.id!r}"
        if terminal is None:
            log.info("%s: the client is gone; aborted", who)
            return
        sent = await self._send(job.client, job.envelope, terminal, self.config.send_timeout_s)
        for _ in range(job.aborts if sent else 0):  # one `aborted` per abort request
            if not await self._send(job.client, job.envelope, p.Aborted(job.request.id),
                                    self.config.send_timeout_s):
                break
        if isinstance(terminal, p.ErrorReply):
            log.info("%s: error %s: %s", who, terminal.code, terminal.message)
        else:
            log.info("%s: %s, %d prompt + %d generated tokens, ttft %.1f ms, tpot %.1f ms, "
                     "e2e %.1f ms", who, terminal.finish_reason, terminal.prompt_tokens,
                     terminal.completion_tokens, terminal.ttft_s * 1e3, terminal.tpot_s * 1e3,
                     terminal.e2e_s * 1e3)

    # -- health, sending -----------------------------------------------------------

    async def _health(self, client: bytes, envelope: list[bytes],
                      request_id: p.RequestId | None = None) -> None:
        try:
            report = await self.health_report(request_id)
            await self._send(client, envelope, report, self.config.send_timeout_s)
        finally:
            self._health_replies -= 1

    async def health_report(self, request_id: p.RequestId | None = None) -> p.HealthReport:
        """The engine's state, asked of the engine thread (answered between steps)."""
        status = "ok"
        if self._engine_counts is None or self._engine_counts.done():
            self._engine_counts = asyncio.ensure_future(self.engine.call(
                lambda core: (len(core.book.waiting), len(core.book.running))))
            self._engine_counts.add_done_callback(  # its failure is read below, or moot
                lambda t: t.cancelled() or t.exception())
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                waiting, running = await asyncio.shield(self._engine_counts)
        except (TimeoutError, EngineStopped):
            snapshot = self.engine.metrics.snapshot()
            status, waiting, running = "unresponsive", snapshot["waiting"], snapshot["running"]
        engine = self.engine.health()
        if engine["status"] == "failed":
            status = "failed"
        spec, config = self.engine.spec, self.config
        report = p.HealthReport(status, spec.name or config.engine.model, spec.family,
                                spec.vocab_size, spec.max_position_embeddings,
                                _scheduler_name(config.engine.scheduler),
                                tuple(config.engine.devices), config.engine.transport, running,
                                waiting, engine["restarts"],
                                engine["last_error"], engine.get("actor_restarts", 0),
                                engine.get("last_actor_error"), id=request_id)
        return report

    async def _send(self, client: bytes, envelope: list[bytes], reply: p.Reply,
                    timeout: float) -> bool:
        """Send one reply; False when the client cannot take it (gone, or not reading)."""
        assert self._socket is not None
        try:
            async with asyncio.timeout(timeout):
                await self._socket.send_multipart([client, *envelope, p.encode(reply.wire())])
            return True
        except (zmq.ZMQError, TimeoutError) as exc:
            log.info("client %s: reply not delivered (%s)", client.hex(), exc or "timed out")
            return False
