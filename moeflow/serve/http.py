"""The OpenAI-compatible HTTP front end of `moeflow serve` (docs/http.md).

    moeflow serve MODEL --http 127.0.0.1:8000 [--bind tcp://127.0.0.1:5555]

Starlette under uvicorn (httptools), in the request server's own event loop and over its
AsyncEngine: HTTP and the ZeroMQ protocol can serve the same engine at once, and a request
from either is batched with the others. Routes:

    POST /v1/completions, /v1/chat/completions   JSON, or server-sent events with "stream"
    GET  /v1/models, /health, /metrics, /version
    POST /tokenize

A request is checked strictly, as OpenAI does (an unknown field is a 400 naming it), then
admitted to the engine; a full engine answers 429. Every error has OpenAI's body,
{"error": {"message", "type", "param", "code"}}. A stream sends one chunk per generated
token, the last of them with the finish_reason (a chat stream starts with one more, the
assistant's role), then the usage chunk if asked for, and `data: [DONE]`. A chunk's text
may be empty: its token ends mid-character, or the text may be the start of a stop string
and waits for the next token (a stop string itself is never sent).

A client that disconnects cancels its call: leaving the engine's event stream aborts the
request and frees its KV cache, for streams and for plain requests alike. At shutdown every
call in progress ends with finish_reason "abort", as on the ZeroMQ side.

Only loopback addresses are served unless an API key is set; with one, every route except
/health and /version needs `Authorization: Bearer KEY`, compared in constant time. TLS is
a reverse proxy's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from moeflow.serve import protocol as p
from moeflow.serve.events import EngineStopped, Event, FinalEvent, OverloadedError
from moeflow.serve.chat import ChatTemplate, ChatTemplateError, GenerationDefaults
from moeflow.serve.openai_schema import (
    ApiError, Call, Fields, bad, check_model, check_names, fit_sampling, json_brief, parse_call,
    parse_messages,
)
from moeflow.serve.asgi import MAX_CONNECTIONS, PROMETHEUS_TYPE, HttpEndpoint
from moeflow.serve.sse import Chunks, HoldBack, LogprobsFormat, sse_json

if TYPE_CHECKING:
    from moeflow.serve.server import RequestServer

log = logging.getLogger("moeflow.http")

MAX_BODY_BYTES = 8 << 20  # as the ZeroMQ side's largest message
REQUEST_ROOM_BYTES = 64 << 10  # a call's fields beside its prompt (messages' roles, stops)
INLINE_PARSE_BYTES = 64 << 10  # larger bodies are parsed in a worker thread
BODY_TIMEOUT_S = 30.0  # a request body not all here by then gets 408
OPEN_PATHS = frozenset({"/health", "/version"})  # served without the API key
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SHUTDOWN_ABORT_S = 2.0  # at shutdown, how long a call waits for the engine's "abort" final
# how a lone surrogate gets into parsed JSON: a \uD800-\uDFFF escape, or (json.loads
# decodes bytes with "surrogatepass") a surrogate's own UTF-8 bytes, ED A0-BF xx
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


class _Gone(Exception):
    """The client disconnected before its request's body all arrived: nobody reads a
    reply (a client timing out on a slow upload, a proxy dropping the connection)."""


def parse_address(address: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv6 in brackets) -> (host, port); ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]"), int(port)


def is_loopback_host(host: str) -> bool:
    """localhost, or an address of the loopback: 127.0.0.1, ::1, ::ffff:127.0.0.1, and the
    short forms of IPv4 that clients send as written (127.1, 2130706433)."""
    import ipaddress
    import socket

    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # inet_aton reads IPv4's short and numeric forms, as resolvers do
            return ipaddress.IPv4Address(socket.inet_aton(host)).is_loopback
        except OSError:
            return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def check_http_bind(address: str, api_key: str | None) -> None:
    """SecurityError unless `address` is loopback or an API key is set."""
    from moeflow.serve.security import SecurityError

    host, _ = parse_address(address)
    if api_key is None and not is_loopback_host(host):
        raise SecurityError(
            f"refusing to serve HTTP on {address}: it is reachable from other machines. "
            f"Serve a loopback address (127.0.0.1:PORT) or require a key with --api-key KEY "
            f"(or the MOEFLOW_API_KEY environment variable); put TLS in a reverse proxy")


class OpenAIFrontEnd:
    """The HTTP routes over a RequestServer's engine; `start()` binds, `run()` serves."""

    def __init__(self, server: RequestServer, address: str, *, api_key: str | None = None,
                 chat_template: str | None = None, served_model_name: str | None = None,
                 allowed_hosts: tuple[str, ...] = ()) -> None:
        check_http_bind(address, api_key)
        self.server = server
        self.host, self.port = parse_address(address)
        self.api_key = api_key
        self.allowed_hosts = allowed_hosts
        config = server.config.engine
        self.model_name = served_model_name or config.model
        self.template = ChatTemplate.load(config.model, chat_template)
        self.defaults = GenerationDefaults.load(config.model)
        if self.defaults.ignored:  # sampled without them: say so once, at start-up
            log.warning("generation_config.json sets %s, which moeflow does not apply: "
                        "requests sample without them", ", ".join(self.defaults.ignored))
        self.calls: set[Call] = set()
        self.stopping = False  # shutdown began: new calls get 503, admitted ones "abort"
        self.address: str | None = None  # http://host:port once bound
        # room for every request in progress to stream, and as many more connections idle
        self._endpoint = HttpEndpoint(self.app(), self.host, self.port,
                                      max(MAX_CONNECTIONS, 2 * config.max_waiting))

    @property
    def max_body_bytes(self) -> int:
        """The largest body a valid call can be, at most MAX_BODY_BYTES: the longest text
        prompt JSON-escaped (up to 6 bytes a byte: \\u0000), prompt ids at up to 9 bytes
        each, and room for the rest. Parsing a body holds the interpreter for time that
        grows with its size, so larger ones are refused unread."""
        limits = self.server.limits
        if limits.max_prompt_tokens is None or limits.max_prompt_bytes is None:
            return MAX_BODY_BYTES
        return min(MAX_BODY_BYTES, 6 * limits.max_prompt_bytes + 9 * limits.max_prompt_tokens
                   + REQUEST_ROOM_BYTES)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Bind now, so that a busy port fails plainly before serving starts."""
        self.address = self._endpoint.start()

    async def run(self) -> None:
        await self._endpoint.run()

    def shutdown(self) -> None:
        """End every call in progress with finish_reason "abort"; stop accepting."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        for call in list(self.calls):
            call.abort_reason = "shutdown"
            if call.task is None:
                continue
            if call.engine_id is not None and self.server.engine.abort_soon(call.engine_id):
                # the engine ends it with an "abort" final that carries the text and the
                # usage so far; cancelling is the fallback, should that final not come
                loop.call_later(SHUTDOWN_ABORT_S, self._cancel_if_waiting, call)
            else:
                call.task.cancel()
        self._endpoint.stop()

    def close(self) -> None:
        self._endpoint.close()

    def _cancel_if_waiting(self, call: Call) -> None:
        if call in self.calls and call.task is not None:  # still reading its events
            call.task.cancel()

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics, methods=["GET"]),
                  Route("/version", self.version, methods=["GET"]),
                  Route("/tokenize", self.tokenize, methods=["POST"])]
        app = Starlette(routes=routes, exception_handlers={404: _not_found,
                                                           405: _not_allowed})
        return _Guard(app, self.api_key, self.allowed_hosts)

    # -- routes --------------------------------------------------------------------

    async def completions(self, request: Any) -> Any:
        return await self._serve_call(request, chat=False)

    async def chat_completions(self, request: Any) -> Any:
        return await self._serve_call(request, chat=True)

    async def models(self, request: Any) -> Any:
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Any) -> Any:
        """GET /v1/models/{model}: the served model's card, as /v1/models lists it."""
        name = request.path_params["model"]
        if name != self.model_name:
            return _json(ApiError(404, f"model: {name!r} is not served here (this server "
                                       f"serves {self.model_name!r})", "model",
                                  "model_not_found").body(), 404)
        return _json(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": int(self.server.started),
                "owned_by": "moeflow", "root": self.server.config.engine.model,
                "max_model_len": self.server.engine.context}

    async def health(self, request: Any) -> Any:
        report = (await self.server.health_report()).wire()
        report.pop("type", None)
        report.pop("id", None)
        report["model"] = self.model_name  # the name requests give, as /v1/models says
        return _json(report, 200 if report["status"] == "ok" else 503)

    async def metrics(self, request: Any) -> Any:
        from starlette.responses import Response

        return Response(self.server.engine.metrics.prometheus(), media_type=PROMETHEUS_TYPE)

    async def version(self, request: Any) -> Any:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("moeflow")
        except PackageNotFoundError:
            number = "unknown"
        return _json({"version": number})

    async def tokenize(self, request: Any) -> Any:
        """{"prompt": str} or {"messages": [...]} -> {"tokens", "count", "max_model_len"}
        (vLLM's shape)."""
        try:
            return await self._tokenize(request)
        except _Gone:
            return _gone()

    async def _tokenize(self, request: Any) -> Any:
        try:
            obj = await self._read_json(request)
            fields = {"model", "prompt", "messages", "add_generation_prompt",
                      "add_special_tokens"}
            check_names(obj, fields)
            check_model(obj, self.model_name)  # optional here, but not another's
            if ("prompt" in obj) == ("messages" in obj):
                raise bad("prompt", "give exactly one of prompt and messages")
            # vLLM's defaults: a prompt gets the tokenizer's special tokens, a rendered
            # chat template (which writes its own) none
            special = Fields(obj).boolean("add_special_tokens", "prompt" in obj)
            add = Fields(obj).boolean("add_generation_prompt", True)
            if "prompt" in obj:
                text = Fields(obj).string("prompt")
                p.check_prompt_bytes(text, self.server.limits, None)
                ids = await self._encode(text, special)
            else:
                ids = await self._encode(self._render(obj["messages"], add), special)
        except ApiError as exc:
            return _json(exc.body(), exc.status)
        except p.ProtocolError as exc:
            error = ApiError.of(exc)
            return _json(error.body(), error.status)
        return _json({"tokens": ids, "count": len(ids),
                      "max_model_len": self.server.engine.context})

    # -- one generation ------------------------------------------------------------

    async def _serve_call(self, request: Any, chat: bool) -> Any:
        try:
            return await self._serve_admitted(request, chat)
        except _Gone:  # not admitted: nothing runs, nothing is counted
            return _gone()

    async def _serve_admitted(self, request: Any, chat: bool) -> Any:
        try:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            call = parse_call(await self._read_json(request), chat,
                              model_name=self.model_name,
                              max_new_tokens=self.server.limits.max_new_tokens,
                              defaults=self.defaults, render=self._render)
            prompt_ids = await self._prompt_ids(call)
            params = fit_sampling(call, len(prompt_ids), self.server.engine.context,
                                  self.server.limits.max_new_tokens, self.defaults)
            # a whole response without log-probabilities reads the final event alone
            engine_id = await self.server.engine.add(
                prompt_ids, params,
                stream=call.stream or call.sampling.get("logprobs") is not None)
            if self.stopping:  # admitted while shutdown began: it will not run
                self.server.engine.drop(engine_id)
                raise EngineStopped("the server is shutting down")
        except ApiError as exc:
            return self._error(exc)
        except p.ProtocolError as exc:
            return self._error(ApiError.of(exc))
        except OverloadedError as exc:
            return self._error(ApiError(429, f"the server is full: {exc}; retry later",
                                        None, p.OVERLOADED))
        except EngineStopped as exc:
            return self._error(ApiError(503, str(exc), None, "unavailable"))
        except ValueError as exc:  # the engine refused the request (stop strings, say)
            return self._error(ApiError(400, str(exc), None, "invalid_request"))
        if call.stream:
            from starlette.responses import StreamingResponse

            return StreamingResponse(self._sse(call, engine_id, len(prompt_ids)),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await self._whole(request, call, engine_id, prompt_ids)

    async def _prompt_ids(self, call: Call) -> list[int]:
        limits = self.server.limits
        if call.prompt_ids is not None:
            ids = call.prompt_ids
        else:
            assert call.prompt_text is not None
            p.check_prompt_bytes(call.prompt_text, limits, None)
            # a chat template writes its own special tokens (a BOS): the tokenizer adds none
            ids = await self._encode(call.prompt_text, not call.chat)
        outside = [t for t in ids if not 0 <= t < (limits.vocab_size or 1 << 62)]
        if outside:  # sent so, or the tokenizer's (one with tokens the model lacks)
            raise bad("messages" if call.chat else "prompt",
                      f"{'messages' if call.chat else 'prompt'}: token ids {outside[:5]} are "
                      f"outside the model's vocabulary [0, {limits.vocab_size})")
        if not ids:
            raise bad("messages" if call.chat else "prompt", "the prompt is empty")
        if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
            raise bad("messages" if call.chat else "prompt",
                      f"the prompt has {len(ids)} tokens; this server takes at most "
                      f"{limits.max_prompt_tokens}", "context_length_exceeded")
        return ids

    async def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.server.engine.tokenizer is None:
            raise bad("prompt", "this model has no tokenizer: send the prompt as token ids")
        return await asyncio.to_thread(self.server.engine.encode, text, add_special_tokens)

    def _render(self, messages: Any, add_generation_prompt: bool) -> str:
        if self.template is None:
            raise bad("messages", "this model has no chat template (no chat_template in "
                                  "tokenizer_config.json, no chat_template.jinja): start the "
                                  "server with --chat-template FILE, or use /v1/completions",
                      "no_chat_template")
        try:
            return self.template.render(parse_messages(messages), add_generation_prompt)
        except ChatTemplateError as exc:
            raise bad("messages", f"messages: {exc}") from None

    async def _read_json(self, request: Any) -> dict[str, Any]:
        """The body as a JSON object; ApiError if it is not one, _Gone if the client left
        before sending all of it."""
        from starlette.requests import ClientDisconnect

        size = request.headers.get("content-length")
        most = self.max_body_bytes
        if size is not None and size.isdigit() and int(size) > most:
            raise ApiError(413, f"the body has {size} bytes; at most {most}", None,
                           "body_too_large")
        parts, total = [], 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):  # a body sent a byte at a time
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > most:
                        raise ApiError(413, f"the body is over {most} bytes", None,
                                       "body_too_large")
                    parts.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s", None,
                           "timeout") from None
        except ClientDisconnect:
            log.info("%s: the client left before its body arrived (%d bytes of %s)",
                     request.url.path, total, size or "?")
            raise _Gone() from None
        body = b"".join(parts)
        try:
            obj = (await asyncio.to_thread(json.loads, body) if len(body) > INLINE_PARSE_BYTES
                   else json.loads(body))
        except (ValueError, RecursionError) as exc:
            raise bad(None, f"the body is not valid JSON ({exc})", "malformed") from None
        if _nests_deeper(obj, p.MAX_DEPTH):
            raise bad(None, f"the body nests objects and arrays more than {p.MAX_DEPTH} deep",
                      "malformed")
        if not isinstance(obj, dict):
            raise bad(None, f"the body must be a JSON object, got {json_brief(obj)}",
                      "malformed")
        if ((_SURROGATE.search(body) or not _utf8_bytes(body))
                and _has_lone_surrogate(obj)):
            # JSON lets \ud800 stand alone (a JavaScript string cut in the middle of an
            # emoji); no tokenizer, and no UTF-8 reply, can hold it
            raise bad(None, "the body has a string with an unpaired UTF-16 surrogate "
                            "(\\ud800-\\udfff): not valid Unicode text", "malformed")
        return obj

    # -- answering -----------------------------------------------------------------

    def _error(self, error: ApiError, admitted: bool = False) -> Any:
        """OpenAI's error response. A request refused before admission is counted as
        rejected (one the engine ended in error is counted by the engine)."""
        if not admitted:
            self.server.engine.metrics.rejected(error.code or str(error.status))
        return _json(error.body(), error.status)

    async def _events(self, call: Call, engine_id: int
                      ) -> AsyncGenerator[Event | None, None]:
        """The request's events; None once, in place of the final, when the call was
        aborted (shutdown). Cancelling the caller aborts the request in the engine."""
        call.task, call.engine_id = asyncio.current_task(), engine_id
        self.calls.add(call)
        if self.stopping:  # shutdown began before this call's events were read
            self.calls.discard(call)
            self.server.engine.drop(engine_id)
            yield None
            return
        try:
            stream = cast(AsyncGenerator[Event, None], self.server.engine.events(engine_id))
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    yield event
                    if isinstance(event, FinalEvent):
                        return
        except asyncio.CancelledError:
            if call.abort_reason is None:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            yield None
        finally:
            self.calls.discard(call)

    def _logprobs_format(self, call: Call) -> LogprobsFormat | None:
        if call.sampling.get("logprobs") is None:
            return None
        tokenizer = self.server.engine.tokenizer
        return LogprobsFormat(call.chat, tokenizer.token_bytes if tokenizer
                              else (lambda i: b""))

    async def _sse(self, call: Call, engine_id: int, num_prompt: int
                   ) -> AsyncIterator[bytes]:
        chunks = Chunks(call)
        held = HoldBack(call.sampling["stop"])
        lp = self._logprobs_format(call)
        if call.chat:
            yield chunks.first()
        # the last token's text and id wait for the finish_reason, sent with them
        num_tokens, pending, last_id, last_lp = 0, "", list[int](), None
        try:
            async with contextlib.aclosing(self._events(call, engine_id)) as events:
                async for event in events:
                    if event is None or isinstance(event, FinalEvent):
                        break
                    num_tokens += 1
                    logprobs = (lp.of(event.token_id, event.logprobs)
                                if lp is not None and event.logprobs is not None else None)
                    if event.last:  # one chunk per token: the last carries the finish_reason
                        pending, last_id = held.add(event.text), [event.token_id]
                        last_lp = logprobs
                    else:
                        yield chunks.token(held.add(event.text), event.token_id, logprobs)
                else:
                    raise EngineStopped("the engine ended the request without a final")
        except EngineStopped as exc:  # the engine stopped under this call
            yield sse_json(ApiError(503, str(exc), None, "unavailable").body())
            yield b"data: [DONE]\n\n"
            return
        # the end: its reason with the last token, then the usage and [DONE]
        reason, text = ("abort", held.rest(None)) if event is None else (
            event.finish_reason, held.rest(event.text))
        text = pending + text
        if event is not None:
            num_prompt, num_tokens = event.prompt_tokens, event.completion_tokens
        if reason.startswith("error"):
            yield sse_json(ApiError(500, reason.removeprefix("error: "), None,
                                    "internal").body())
        else:
            yield chunks.last(text, reason, last_id, last_lp)
            if call.include_usage:
                yield chunks.usage(num_prompt, num_tokens)
        yield b"data: [DONE]\n\n"

    async def _whole(self, request: Any, call: Call, engine_id: int, prompt_ids: list[int]
                     ) -> Any:
        lp = self._logprobs_format(call)
        parts: list[dict[str, Any]] = []  # each token's log-probabilities, if asked

        async def collect() -> FinalEvent | None:
            async with contextlib.aclosing(self._events(call, engine_id)) as events:
                async for event in events:
                    if event is None or isinstance(event, FinalEvent):
                        return event
                    if lp is not None and event.logprobs is not None:
                        parts.append(lp.of(event.token_id, event.logprobs))
            raise EngineStopped("the engine ended the request without a final")

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client left: abort the request, free its KV
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            if watch.done() and not watch.cancelled() and watch.exception() is not None:
                log.info("call %s: the connection failed: %r", call.id, watch.exception())
        if work.cancelled():
            return _gone()
        try:
            final = work.result()
        except EngineStopped as exc:
            return self._error(ApiError(503, str(exc), None, "unavailable"), admitted=True)
        ids: tuple[int, ...] = ()
        if final is None:
            reason, text = "abort", ""
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": 0}
        else:
            if final.error:
                return self._error(ApiError(500, final.error.removeprefix("error: "), None,
                                            "internal"), admitted=True)
            reason, text, usage, ids = (final.finish_reason, final.text, final.usage,
                                        final.token_ids)
        usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        choice: dict[str, Any] = {"index": 0, "logprobs": None if lp is None else lp.join(parts),
                                  "finish_reason": reason}
        if call.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if call.return_token_ids:
            choice["prompt_token_ids"], choice["token_ids"] = prompt_ids, list(ids)
        return _json({"id": call.id, "object": "chat.completion" if call.chat
                      else "text_completion", "created": call.created, "model": call.model,
                      "choices": [choice], "usage": usage})


def _utf8_bytes(body: bytes) -> bool:
    """Whether json.loads reads `body` as UTF-8 (else UTF-16 or UTF-32, by its BOM or its
    zero bytes, where a surrogate's code unit stands as itself)."""
    return not (b"\x00" in body[:4] or body.startswith((b"\xff\xfe", b"\xfe\xff")))


def _has_lone_surrogate(obj: Any) -> bool:
    """Whether a string of JSON `obj` (a key or a value) holds an unpaired surrogate."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _nests_deeper(obj: Any, limit: int) -> bool:
    """Whether JSON `obj` nests objects and arrays more than `limit` deep (iteratively)."""
    level = [obj]
    for _ in range(limit):
        level = [v for x in level if isinstance(x, (dict, list))
                 for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return False
    return any(isinstance(x, (dict, list)) for x in level)


def _json(obj: Any, status: int = 200) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status)


def _gone() -> Any:
    """The response to a client that has left: nobody reads it (nginx's 499)."""
    from starlette.responses import Response

    return Response(status_code=499)


async def _not_found(request: Any, exc: Any) -> Any:
    return _json(ApiError(404, f"{request.url.path}: no such route (see docs/http.md)", None,
                          "not_found").body(), 404)


async def _not_allowed(request: Any, exc: Any) -> Any:
    return _json(ApiError(405, f"{request.method} {request.url.path}: method not allowed",
                          None, "method_not_allowed").body(), 405)


def host_name(host: bytes | str) -> str:
    """A Host header's name: lower case, without its port or a trailing dot."""
    name = (host.decode("latin-1") if isinstance(host, bytes) else host).strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    return name.removesuffix(".")


def _local_host(host: bytes, allowed: frozenset[str]) -> bool:
    """A Host header naming this machine's loopback (any port) or an allowed name: what a
    client of a loopback server sends (a client without one, HTTP/1.0, is no browser), and
    what a page on another origin, DNS rebound to 127.0.0.1, does not."""
    if not host:
        return True
    name = host_name(host)
    return name in allowed or name.endswith(".localhost") or is_loopback_host(name)


class _Guard:
    """ASGI middleware, before any route: the API key (when set) on every route but
    OPEN_PATHS. Without a key (a loopback server): a Host naming the loopback or an allowed
    name (a DNS-rebound page names its own), and a JSON body on POST (a form, text/plain or
    untyped POST is what a web page may send to any origin without asking first)."""

    def __init__(self, app: Any, api_key: str | None, allowed_hosts: tuple[str, ...] = ()
                 ) -> None:
        self.app = app
        self.expected = None if api_key is None else b"Bearer " + api_key.encode()
        self.allowed = frozenset(host_name(h) for h in allowed_hosts)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            if self.expected is not None:  # a page cannot send the key without asking first
                if scope["path"] not in OPEN_PATHS:
                    given = next((v for k, v in headers if k == b"authorization"), b"")
                    if not hmac.compare_digest(given, self.expected):
                        return await _refuse(send, 401, "a valid API key is required: send "
                                             "'Authorization: Bearer KEY'", "invalid_api_key",
                                             [(b"www-authenticate", b"Bearer")])
            else:
                host = next((v for k, v in headers if k == b"host"), b"")
                if not _local_host(host, self.allowed):
                    return await _refuse(send, 403, "this server (loopback, no API key) "
                                         "answers requests to localhost or 127.0.0.1 only "
                                         "(--allowed-host adds a name): Host "
                                         f"{host.decode('latin-1')[:60]!r}", "forbidden_host")
                kind = next((v for k, v in headers if k == b"content-type"), b"")
                if scope["method"] == "POST" and not _json_type(kind):
                    return await _refuse(send, 415, "send the body as JSON, with "
                                         "'Content-Type: application/json'",
                                         "unsupported_media_type")
        await self.app(scope, receive, send)


def _json_type(kind: bytes) -> bool:
    """application/json, or a +json type, parameters aside."""
    media = kind.split(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/")
                                            and media.endswith(b"+json"))


async def _refuse(send: Any, status: int, message: str, code: str,
                  headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    body = json.dumps(ApiError(status, message, None, code).body()).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})
