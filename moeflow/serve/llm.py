"""moeflow.LLM: the synchronous Python API.

    llm = moeflow.LLM("path/to/checkpoint", devices="cpu:0,cpu:1", dtype="auto")
    [out] = llm.generate("Once upon a time", max_new_tokens=32)
    out.text, out.token_ids

A text prompt is tokenized with the checkpoint's tokenizer; a list of ints is used exactly
as given, with nothing prepended.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from moeflow.scheduler.base import Scheduler
from moeflow.serve.async_engine import AsyncEngine, FinalEvent, OverloadedError, is_token_id
from moeflow.serve.config import EngineConfig
from moeflow.serve.engine import EngineCore
from moeflow.ops.sampling import Logprobs, SamplingParams

Prompt = Union[str, Sequence[int]]


class NoTokenizerError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Completion:
    request_id: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    ttft_s: float
    e2e_s: float
    # with `SamplingParams(logprobs=N)`: per generated token, its log-probability and the N
    # likeliest tokens' (id, log-probability), most likely first; else None
    logprobs: tuple[Logprobs, ...] | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        decode = self.e2e_s - self.ttft_s
        return (len(self.token_ids) - 1) / decode if decode > 0 and len(self.token_ids) > 1 \
            else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_token_ids) / self.ttft_s if self.ttft_s > 0 else 0.0


class _LoopThread:
    """An event loop on a daemon thread, for synchronous callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="moeflow-llm",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        if not self.thread.is_alive():
            coro.close()
            raise RuntimeError("the LLM is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:  # Ctrl-C or a timeout here: the work stops there too (a
            future.cancel()  # cancelled generate aborts its requests and frees their KV)
            raise

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


def _shut_down(loop: _LoopThread, engine: Any) -> None:
    """Stop the engine and the loop thread: on close(), on garbage collection, and at
    interpreter exit (while the loop thread still runs), whichever comes first."""
    with contextlib.suppress(Exception):
        loop.run(engine.stop(), timeout=90)
    loop.stop()


class LLM:
    """The synchronous API: a thin facade over AsyncEngine (which it runs on an event loop
    thread of its own)."""

    def __init__(self, model: str | Path | EngineConfig, devices: str | Sequence[str] = "cpu:0",
                 dtype: str = "auto", scheduler: str | Scheduler = "batch-ep",
                 **options: Any) -> None:
        """`model`: a checkpoint directory (and EngineConfig's fields beside it), or a whole
        EngineConfig."""
        config = model if isinstance(model, EngineConfig) else EngineConfig(
            str(model), scheduler, devices, dtype, **{"max_waiting": 1 << 30, **options})
        self.config = config
        self.model_dir = Path(config.model)
        self.devices = config.devices
        self._loop = _LoopThread()
        self._async = AsyncEngine(config)
        self._closer = weakref.finalize(self, _shut_down, self._loop, self._async)
        try:
            self._loop.run(self._async.start())
        except BaseException:
            self._closer()
            raise
        self.spec = self._async.spec
        self.tokenizer = self._async.tokenizer
        self.engine: EngineCore = self._async._thread.core  # type: ignore[union-attr]
        self.executor = self.engine.executor
        self.dtype = self._async._thread.dtype  # type: ignore[union-attr]

    def close(self) -> None:
        """Stop the engine and any actor processes (also on `with LLM(...) as llm:` exit,
        when the LLM is garbage collected, and at interpreter exit)."""
        self._closer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str) and self.tokenizer is None:
            raise NoTokenizerError(f"{self.model_dir} has no tokenizer.json, so text prompts "
                                   f"cannot be encoded; pass token ids instead")
        return self._async.encode(prompt)

    def generate(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int | None = None,
                 temperature: float | None = None, *, sampling: SamplingParams | None = None
                 ) -> list[Completion]:
        """Generate for one prompt or a list of them; returns one Completion per prompt.
        `max_new_tokens` (default 16) and `temperature` (default 0: greedy), or a whole
        `sampling`, not both."""
        if sampling is not None and (max_new_tokens is not None or temperature is not None):
            raise TypeError("give max_new_tokens and temperature, or sampling=SamplingParams"
                            "(...) holding them, not both")
        params = sampling or SamplingParams(
            max_new_tokens=16 if max_new_tokens is None else max_new_tokens,
            temperature=0.0 if temperature is None else temperature)
        batch = [self.encode(p) for p in _as_batch(prompts)]
        return list(self._loop.run(self._generate_all(batch, params)))

    async def _generate_all(self, batch: list[list[int]], params: SamplingParams
                            ) -> list[Completion]:
        # each request is collected as soon as it is admitted; when `max_waiting` requests
        # are in progress (an EngineConfig's 1024, or another caller's), the rest wait for
        # one of this batch's to finish instead of failing the whole batch
        ids: list[int] = []
        collecting: list[asyncio.Task[Completion]] = []
        try:
            for prompt in batch:
                while True:
                    try:
                        request_id = await self._async.add(prompt, params, stream=False)
                        break
                    except OverloadedError:
                        running = [t for t in collecting if not t.done()]
                        if not running:  # none of ours to wait for: the caller's to handle
                            raise
                        await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                ids.append(request_id)
                collecting.append(asyncio.ensure_future(self._collect(request_id, prompt)))
            return list(await asyncio.gather(*collecting))
        except BaseException:  # cancelled, or failed: what was admitted is withdrawn
            for request_id, task in zip(ids, collecting):
                task.cancel()
                self._async.drop(request_id)  # also if its task never started reading
            await asyncio.gather(*collecting, return_exceptions=True)
            raise

    async def _collect(self, request_id: int, prompt: list[int]) -> Completion:
        async for event in self._async.events(request_id):
            if isinstance(event, FinalEvent):
                return Completion(request_id, tuple(prompt), event.token_ids, event.text,
                                  event.finish_reason, event.ttft_s, event.e2e_s,
                                  event.logprobs)
        raise RuntimeError(f"request {request_id} ended without a final event")

    def routing_recording(self) -> dict[str, object]:
        """Rows routed to each expert per layer so far (with `record_routing=True`), in the
        form `moeflow simulate --routing recorded:FILE` reads."""
        if self.executor.routing is None:
            raise ValueError("routing is recorded only with LLM(..., record_routing=True)")
        return {"model": self.spec.name, "family": self.spec.family,
                "layers": {str(k): v for k, v in sorted(self.executor.routing.items())}}


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a text, a list of token ids, or a list of those, "
                        f"got {type(prompts).__name__}")
    items = list(prompts)
    if not items:
        raise ValueError("no prompts given")
    if any(is_token_id(t) for t in items):
        return [items]  # one token-id prompt (checked when encoded)
    return items
