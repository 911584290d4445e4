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
import operator
import queue
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from moeflow.ops.sampling import SamplingParams
from moeflow.serve.config import EngineConfig
from moeflow.serve.engine_thread import RESTART_WINDOW_S, EngineThread
from moeflow.serve.events import EngineStopped, Event, FinalEvent, OverloadedError, TokenEvent
from moeflow.serve.metrics import Metrics

STOP_TIMEOUT_S = 60.0  # closing the executor stops actor processes: bounded, but not instant
Prompt = Union[str, Sequence[int]]


@dataclass
class _Stream:
    """The event loop's end of one request."""

    events: asyncio.Queue[Event | BaseException] = field(default_factory=asyncio.Queue)


def _settled(future: asyncio.Future[Any]) -> None:
    """For a command nobody waits on: its outcome (an engine that stopped) is moot."""
    if not future.cancelled():
        future.exception()


def is_token_id(value: object) -> bool:
    """An integer (Python's, numpy's, a one-element integer tensor's), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self._thread: EngineThread | None = None
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count()
        self.spec: Any = None
        self.tokenizer: Any = None
        self.context = 0  # the tokens a request may reach (EngineCore.context), once started
        self._stopped = asyncio.Event()

    @classmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> AsyncEngine:
        """`options`: the fields of EngineConfig (scheduler, devices, dtype, transport, ...)."""
        return cls(EngineConfig(str(path), **options))

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> AsyncEngine:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._thread = EngineThread(self.config, loop, self._deliver, self.metrics,
                                     self._on_exit)
        self._thread.start()
        core = await self._thread.ready
        self.spec, self.tokenizer, self.context = core.spec, core.tokenizer, core.context
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
        self._stopped.set()  # _on_exit finds no thread any more: wait_stopped() returns

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
        """"ok" (restarts and the last failure, if any), "failed" with the reason once the
        engine gave up, or "stopped" (not started, or stopped when told)."""
        thread = self._thread
        if thread is None or thread.exited:
            fatal = None if thread is None else thread.fatal
            return {"status": "failed" if fatal else "stopped",
                    "restarts": 0 if thread is None else len(thread.restarts),
                    "last_error": None if thread is None else fatal or thread.last_error}
        now = time.monotonic()
        executor = getattr(thread.core, "executor", None)  # read across threads: two fields
        return {"status": "ok",
                "restarts": sum(1 for t in thread.restarts if now - t < RESTART_WINDOW_S),
                "last_error": thread.last_error,
                "actor_restarts": getattr(executor, "restarts", 0),
                "last_actor_error": getattr(executor, "last_restart", None)}

    async def __aenter__(self) -> AsyncEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- requests ------------------------------------------------------------------

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        """A text prompt's token ids (with the tokenizer's special tokens, unless told:
        a rendered chat template has its own), or token ids checked."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model} has no tokenizer.json, so text prompts "
                                 f"cannot be encoded; pass token ids instead")
            return list(self.tokenizer.encode(prompt, add_special_tokens))
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError("a prompt is a str or a sequence of token ids, not bytes: "
                            "decode it first")
        ids = list(prompt)
        if not all(is_token_id(t) for t in ids):
            raise TypeError(f"a token-id prompt must be a sequence of ints, got {ids[:8]!r}")
        return [operator.index(t) for t in ids]  # numpy's and torch's integers as ints

    async def add(self, prompt: Prompt, params: SamplingParams | None = None, *,
                  stream: bool = True) -> int:
        """Admit a request; returns its id. Its events come from `events(id)`: a TokenEvent
        per token, then the FinalEvent; with `stream=False` only the FinalEvent (for a
        caller that wants the whole completion: no text decoded and no wakeup of this
        loop per token, which cost the engine's thread 50-200 us a step)."""
        thread = self._running()
        # tokenizing a long text takes a while: off the event loop, which serves everyone
        ids = (await asyncio.to_thread(self.encode, prompt) if isinstance(prompt, str)
               else self.encode(prompt))
        thread = self._running()
        request_id = next(self._ids)
        self._streams[request_id] = _Stream()
        try:
            await thread.submit("add", (ids, params or SamplingParams(), request_id, stream))
        except BaseException:
            self._streams.pop(request_id, None)
            self._abort_soon(request_id)  # the engine may admit it yet (FIFO after add)
            raise
        return request_id

    async def events(self, request_id: int) -> AsyncIterator[Event]:
        """A request's events, once: its TokenEvents (unless added with stream=False),
        then its FinalEvent. A request added and never read keeps its events until
        `drop(request_id)`."""
        stream = self._streams.get(request_id)
        if stream is None:
            raise KeyError(f"request {request_id} is not in progress here: never added, or "
                           f"its events were already read (each request's, once)")
        finished = False
        try:
            while True:
                event = await stream.events.get()
                if isinstance(event, BaseException):
                    raise event
                # set before yielding: a consumer that stops at the final never resumes us
                finished = isinstance(event, FinalEvent)
                yield event
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away: abort the request and free its KV
                self._abort_soon(request_id)

    def drop(self, request_id: int) -> None:
        """Abort an admitted request whose events nobody will read, and free its KV."""
        self._streams.pop(request_id, None)
        self._abort_soon(request_id)

    def abort_soon(self, request_id: int) -> bool:
        """Ask the engine to end a request now with finish_reason "abort": its events
        still come, ending with a FinalEvent carrying the text and usage so far. False if
        the engine is not running (no such final will come)."""
        return request_id in self._streams and self._abort_soon(request_id)

    def _abort_soon(self, request_id: int) -> bool:
        """Submit an abort nobody waits on; False if the engine thread has stopped."""
        thread = self._thread
        if thread is None or thread.exited:
            return False
        thread.submit("abort", request_id).add_done_callback(_settled)
        return True

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

    def _running(self) -> EngineThread:
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
