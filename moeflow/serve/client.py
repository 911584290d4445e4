"""Clients of `moeflow serve` (the protocol in docs/protocol.md).

    async with moeflow.AsyncClient("tcp://127.0.0.1:5555") as client:
        async for reply in client.generate("Once upon a time", max_new_tokens=32):
            if reply["type"] == "token":
                print(reply["text"], end="")
            else:  # the final: finish_reason, token_ids, text, usage, timings
                print(reply["usage"])

    with moeflow.Client("tcp://127.0.0.1:5555") as client:
        for reply in client.generate(prompt_ids=[1, 2, 3], max_new_tokens=8): ...

Each client has one DEALER socket; replies are sorted by request id, so several requests
can be in flight on one AsyncClient at once. Every wait for a reply has a timeout (seconds
between replies). A generate given its own `timeout` also carries a deadline (now plus
that timeout) when the server lists the "deadline" feature (asked once per client): the
server then drops it, instead of starting it, once the caller has given up. Leaving a
generate early aborts it on the server. AsyncClient works with asyncio and uvloop; Client
is plain blocking pyzmq, for one thread at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import zmq
import zmq.asyncio

from moeflow.serve import protocol as p

Key = tuple[Any, ...]


class ServerError(RuntimeError):
    """An error reply: `code` is one of protocol.ERROR_CODES."""

    def __init__(self, code: str, message: str, request_id: p.RequestId | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


class _Inbox:
    """Replies sorted by who waits for them (pure: no I/O). A reply nobody waits for (one
    for a generate its caller left) is dropped."""

    def __init__(self) -> None:
        self.queues: dict[Key, deque[dict[str, Any]]] = {}
        self.waiters: dict[Key, int] = {}
        # generates left early (an abort sent): their id is in progress on the server until
        # its final (or error) arrives, and a reply for it must not reach a new generate
        # given the same id
        self.draining: set[Key] = set()

    def open(self, key: Key) -> None:
        self.waiters[key] = self.waiters.get(key, 0) + 1
        self.queues.setdefault(key, deque())

    def close(self, key: Key, drain: bool = False) -> None:
        """Stop waiting on `key`; `drain`: a generate left before its final, whose later
        replies are dropped until that final (or error) arrives."""
        self.waiters[key] -= 1
        if not self.waiters[key]:
            if drain and not any(_ends(r) for r in self.queues[key]):
                self.draining.add(key)
            del self.waiters[key], self.queues[key]

    def put(self, reply: Any) -> None:
        if not isinstance(reply, dict):
            return
        key = _route(reply)
        if key in self.draining:
            if _ends(reply):
                self.draining.discard(key)
            return
        queue = self.queues.get(key)
        if queue is not None:
            queue.append(reply)

    def take(self, key: Key) -> dict[str, Any] | None:
        queue = self.queues[key]
        return queue.popleft() if queue else None


def _route(reply: dict[str, Any]) -> Key:
    kind, rid = reply.get("type"), reply.get("id")
    if kind in (p.HEALTH, p.METRICS):
        return (kind,)
    if kind == p.ABORTED or (kind == p.ERROR and reply.get("code") == p.NOT_FOUND):
        return ("abort", rid)
    if kind == p.ERROR and rid is None:
        if reply.get("code") == p.DUPLICATE_ID:
            return ("duplicate_id",)  # nobody waits: generate refuses duplicates itself
        return ("health",)  # only health and metrics can fail without an id here
    return ("generate", rid)


def _ends(reply: dict[str, Any]) -> bool:
    """A generate's last reply: its final, or an error carrying its id."""
    return reply.get("type") == p.FINAL or (reply.get("type") == p.ERROR
                                            and reply.get("id") is not None)


def _generate_message(request_id: p.RequestId, prompt: str | None,
                      prompt_ids: Sequence[int] | None, params: dict[str, Any]
                      ) -> dict[str, Any]:
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of prompt and prompt_ids")
    message: dict[str, Any] = {"type": p.GENERATE, "id": request_id, **params}
    if prompt is not None:
        message["prompt"] = prompt
    else:
        message["prompt_ids"] = list(prompt_ids or ())
    for name in ("stop", "stop_token_ids"):
        if name in message:
            message[name] = list(message[name])
    return message


def _unique(inbox: _Inbox, key: Key) -> None:
    """Refuse here what the server would refuse with an error this client cannot route (it
    carries no id: the request in progress goes on)."""
    if key in inbox.waiters:
        raise ServerError(p.DUPLICATE_ID, f"id {key[1]!r} is already in progress (refused by "
                                          f"the client)", key[1])


def _with_deadline(params: dict[str, Any], timeout: float | None,
                   features: frozenset[str]) -> dict[str, Any]:
    """`params` with a deadline `timeout` s from now, if the server takes one."""
    if timeout is None or "deadline" in params or "deadline" not in features:
        return params
    return {**params, "deadline": time.time() + timeout}


def _features(health: dict[str, Any]) -> frozenset[str]:
    """The features a health reply lists (a server before protocol version 2 lists none)."""
    features = health.get("features")
    if not isinstance(features, list):
        return frozenset()
    return frozenset(f for f in features if isinstance(f, str))


def _checked(reply: dict[str, Any], expected: str) -> dict[str, Any]:
    if reply.get("type") == p.ERROR:
        raise ServerError(str(reply.get("code")), str(reply.get("message")), reply.get("id"))
    if reply.get("type") != expected:
        raise ServerError(p.INTERNAL, f"expected a {expected} reply, got {reply!r}")
    return reply


def _configure(socket: zmq.Socket[Any], curve_server_key: bytes | str | None,
               curve_public_key: bytes | str | None,
               curve_secret_key: bytes | str | None) -> None:
    socket.linger = 0
    if curve_server_key is None:
        return
    if curve_public_key is None or curve_secret_key is None:
        raise ValueError("CURVE needs the server's public key and this client's key pair")
    socket.curve_serverkey = _bytes(curve_server_key)
    socket.curve_publickey = _bytes(curve_public_key)
    socket.curve_secretkey = _bytes(curve_secret_key)


def _bytes(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else key


class AsyncClient:
    """An asyncio client of `moeflow serve`. CURVE: pass the server's public key and this
    client's key pair (z85, as zmq.auth.load_certificate returns them)."""

    def __init__(self, address: str, *, curve_server_key: bytes | str | None = None,
                 curve_public_key: bytes | str | None = None,
                 curve_secret_key: bytes | str | None = None, timeout: float = 60.0) -> None:
        self.address, self.timeout = address, timeout
        self._socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        _configure(self._socket, curve_server_key, curve_public_key, curve_secret_key)
        self._socket.connect(address)
        self._inbox = _Inbox()
        self._recv_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._features: frozenset[str] | None = None  # the server's, once asked

    async def generate(self, prompt: str | None = None, prompt_ids: Sequence[int] | None = None,
                       *, id: p.RequestId | None = None, timeout: float | None = None,
                       **params: Any) -> AsyncIterator[dict[str, Any]]:
        """Yield the token replies, then the final reply; ServerError on an error reply.
        `params` are the generate fields (max_new_tokens, temperature, stream, ...).
        With `timeout`, the request carries a deadline that many seconds from now (if the
        server takes one); an error deadline_exceeded when the server gets it too late."""
        request_id = next(self._ids) if id is None else id
        key: Key = ("generate", request_id)
        if timeout is not None and self._features is None:
            self._features = _features(await self.health(timeout=timeout))
        params = _with_deadline(params, timeout, self._features or frozenset())
        await self._drained(key, timeout)
        _unique(self._inbox, key)
        self._inbox.open(key)
        finished = False
        try:
            await self._send(_generate_message(request_id, prompt, prompt_ids, params), timeout)
            while True:
                reply = await self._wait(key, timeout)
                if reply["type"] == p.ERROR:
                    finished = True
                    _checked(reply, p.FINAL)
                yield reply
                if reply["type"] == p.FINAL:
                    finished = True
                    return
        finally:
            self._inbox.close(key, drain=not finished)
            if not finished:  # the caller left early: stop the work on the server
                await self._send({"type": p.ABORT, "id": request_id}, timeout)

    async def abort(self, request_id: p.RequestId, *, timeout: float | None = None) -> None:
        """Abort a generate of this client; returns once the server confirms. ServerError
        (not_found) when it is not in progress."""
        key: Key = ("abort", request_id)
        self._inbox.open(key)
        try:
            await self._send({"type": p.ABORT, "id": request_id}, timeout)
            _checked(await self._wait(key, timeout), p.ABORTED)
        finally:
            self._inbox.close(key)

    async def health(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's health reply: model, vocab_size, running, waiting, ..."""
        return await self._query(p.HEALTH, timeout)

    async def metrics(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's metrics reply (the engine's Metrics.snapshot())."""
        return await self._query(p.METRICS, timeout)

    async def _query(self, kind: str, timeout: float | None) -> dict[str, Any]:
        key: Key = (kind,)
        self._inbox.open(key)
        try:
            await self._send({"type": kind}, timeout)
            return _checked(await self._wait(key, timeout), kind)
        finally:
            self._inbox.close(key)

    async def _send(self, message: dict[str, Any], timeout: float | None) -> None:
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                await self._socket.send(p.encode(message))
        except TimeoutError:
            raise TimeoutError(f"could not send to {self.address}") from None

    async def _wait(self, key: Key, timeout: float | None) -> dict[str, Any]:
        seconds = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(seconds):
                while (reply := self._inbox.take(key)) is None:
                    # whoever holds the lock reads one reply for everyone, then lets go
                    async with self._recv_lock:
                        if self._inbox.queues[key]:
                            continue
                        frames = await self._socket.recv_multipart()
                        self._inbox.put(_decode(frames[-1]))
        except TimeoutError:
            raise TimeoutError(f"no reply from {self.address} within {seconds:g} s") from None
        return reply

    async def _drained(self, key: Key, timeout: float | None) -> None:
        """Wait until a generate left early under this id has ended on the server (its id
        is in progress there until then: reusing it would be a duplicate_id)."""
        seconds = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(seconds):
                while key in self._inbox.draining:
                    async with self._recv_lock:
                        if key not in self._inbox.draining:
                            break
                        frames = await self._socket.recv_multipart()
                        self._inbox.put(_decode(frames[-1]))
        except TimeoutError:
            raise TimeoutError(f"id {key[1]!r}: its abort was not answered by "
                               f"{self.address} within {seconds:g} s") from None

    def close(self) -> None:
        self._socket.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A blocking client of `moeflow serve` (its own zmq DEALER socket; no event loop).
    Use from one thread at a time."""

    def __init__(self, address: str, *, curve_server_key: bytes | str | None = None,
                 curve_public_key: bytes | str | None = None,
                 curve_secret_key: bytes | str | None = None, timeout: float = 60.0) -> None:
        self.address, self.timeout = address, timeout
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        _configure(self._socket, curve_server_key, curve_public_key, curve_secret_key)
        self._socket.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
        self._socket.connect(address)
        self._inbox = _Inbox()
        self._ids = itertools.count(1)
        self._features: frozenset[str] | None = None  # the server's, once asked

    def generate(self, prompt: str | None = None, prompt_ids: Sequence[int] | None = None, *,
                 id: p.RequestId | None = None, timeout: float | None = None,
                 **params: Any) -> Iterator[dict[str, Any]]:
        """Yield the token replies, then the final reply; ServerError on an error reply.
        With `timeout`, a deadline as in AsyncClient.generate."""
        request_id = next(self._ids) if id is None else id
        key: Key = ("generate", request_id)
        if timeout is not None and self._features is None:
            self._features = _features(self.health(timeout=timeout))
        params = _with_deadline(params, timeout, self._features or frozenset())
        self._drained(key, timeout)
        _unique(self._inbox, key)
        self._inbox.open(key)
        finished = False
        try:
            self._send(_generate_message(request_id, prompt, prompt_ids, params))
            while True:
                reply = self._wait(key, timeout)
                if reply["type"] == p.ERROR:
                    finished = True
                    _checked(reply, p.FINAL)
                yield reply
                if reply["type"] == p.FINAL:
                    finished = True
                    return
        finally:
            self._inbox.close(key, drain=not finished)
            if not finished:
                self._send({"type": p.ABORT, "id": request_id})

    def abort(self, request_id: p.RequestId, *, timeout: float | None = None) -> None:
        """Abort a generate of this client (its replies are dropped unless its iterator is
        still being read); ServerError (not_found) when it is not in progress."""
        key: Key = ("abort", request_id)
        self._inbox.open(key)
        try:
            self._send({"type": p.ABORT, "id": request_id})
            _checked(self._wait(key, timeout), p.ABORTED)
        finally:
            self._inbox.close(key)

    def health(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._query(p.HEALTH, timeout)

    def metrics(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._query(p.METRICS, timeout)

    def _query(self, kind: str, timeout: float | None) -> dict[str, Any]:
        key: Key = (kind,)
        self._inbox.open(key)
        try:
            self._send({"type": kind})
            return _checked(self._wait(key, timeout), kind)
        finally:
            self._inbox.close(key)

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self._socket.send(p.encode(message))
        except zmq.Again:
            raise TimeoutError(f"could not send to {self.address}") from None

    def _wait(self, key: Key, timeout: float | None) -> dict[str, Any]:
        seconds = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + seconds
        while (reply := self._inbox.take(key)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._socket.poll(max(1, int(left * 1000)), zmq.POLLIN):
                raise TimeoutError(f"no reply from {self.address} within {seconds:g} s")
            self._inbox.put(_decode(self._socket.recv_multipart()[-1]))
        return reply

    def _drained(self, key: Key, timeout: float | None) -> None:
        """As AsyncClient._drained."""
        seconds = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + seconds
        while key in self._inbox.draining:
            left = deadline - time.monotonic()
            if left <= 0 or not self._socket.poll(max(1, int(left * 1000)), zmq.POLLIN):
                raise TimeoutError(f"id {key[1]!r}: its abort was not answered by "
                                   f"{self.address} within {seconds:g} s")
            self._inbox.put(_decode(self._socket.recv_multipart()[-1]))

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(frame: bytes) -> dict[str, Any] | None:
    try:
        return p.decode(frame)
    except p.ProtocolError:
        return None  # not a reply of this protocol: dropped
