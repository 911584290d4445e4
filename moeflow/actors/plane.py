"""The actor plane's walls: who may talk to the coordinator's and the actors' sockets, and
the fault injection a chaos test puts into it.

Another process on the machine must not read a request's tokens, forge a token or a
tensor, wedge the server or fill an actor's memory. So:

- On one host every plane socket is `ipc://` in a private runtime directory (mode 0700,
  made per launch under $XDG_RUNTIME_DIR or /tmp, removed on close); spanning hosts, TCP.
- Every plane socket speaks CURVE. The coordinator makes a key pair per launch for itself
  and one per actor; an actor reads its secret key from its stdin pipe, never from its
  command line or environment.
- In each process a ZAP handler (`Gatekeeper`) admits only the cluster's public keys and
  names each connection after the actor whose key it is: that name comes with every frame
  as its "User-Id", so a message that claims another actor's name is caught.

What an admitted peer can make an actor hold is capped too, in bytes and in messages
(moeflow.actors.core.EARLY_BYTES, EARLY_LIMIT).

Faults (`Faults.parse("drop=0.05,delay=0.02,seed=3")`, applied by `PeerLinks`, an actor's
sockets to its peers): an actor started with them drops each outgoing data-plane message
(Data and Done to peers) with probability `drop`, and holds each one it sends for a
uniform random time in [0, `delay`] seconds (so messages may overtake each other), drawing
from a generator seeded with `seed` and its own name.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import itertools
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

ZAP_DOMAIN = "moeflow-plane"
SEND_TIMEOUT_MS = 5000  # a peer that takes no data for this long loses the message
log = logging.getLogger("moeflow.actor")
_MAX_IPC_PATH = 100  # sockaddr_un holds 108 bytes; leave room for a socket's file name


class PlaneError(RuntimeError):
    """The plane cannot be set up securely (no CURVE in this libzmq, say)."""


def require_curve() -> None:
    if not zmq.has("curve"):
        raise PlaneError(f"libzmq {zmq.zmq_version()} was built without CURVE: the actor plane "
                         f"cannot authenticate its processes (install a pyzmq wheel, which "
                         f"bundles libzmq with libsodium)")


def make_runtime_dir() -> str:
    """A new private directory (0700) for the plane's ipc sockets; the caller removes it."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isdir(base) or len(base) > _MAX_IPC_PATH - 40:
        base = "/tmp"
    path = tempfile.mkdtemp(prefix="moeflow-", dir=base)
    os.chmod(path, 0o700)
    return path


def remove_runtime_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def ipc_address(runtime_dir: str, name: str) -> str:
    return f"ipc://{runtime_dir}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, z85-encoded."""

    public: str
    secret: str = field(repr=False)

    @staticmethod
    def make() -> KeyPair:
        public, secret = zmq.curve_keypair()
        return KeyPair(public.decode(), secret.decode())


@dataclass(frozen=True)
class PlaneKeys:
    """What one actor knows: its own key pair and everyone's public key."""

    own: KeyPair
    coordinator: str  # the coordinator's public key
    actors: dict[str, str]  # actor name -> public key

    def to_plain(self) -> dict[str, Any]:
        return {"own": [self.own.public, self.own.secret], "coordinator": self.coordinator,
                "actors": dict(self.actors)}

    @staticmethod
    def from_plain(data: dict[str, Any]) -> PlaneKeys:
        public, secret = data["own"]
        return PlaneKeys(KeyPair(str(public), str(secret)), str(data["coordinator"]),
                         {str(k): str(v) for k, v in data["actors"].items()})


def serve_curve(sock: zmq.Socket[Any], own: KeyPair) -> None:
    """Make `sock` a CURVE server (call before bind): clients go through the ZAP handler,
    so start the context's Gatekeeper first (with none, libzmq admits any CURVE client)."""
    sock.curve_secretkey = own.secret.encode()
    sock.curve_publickey = own.public.encode()
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()


def connect_curve(sock: zmq.Socket[Any], own: KeyPair, server_public: str) -> None:
    """Make `sock` a CURVE client of the server with `server_public` (call before connect)."""
    sock.curve_secretkey = own.secret.encode()
    sock.curve_publickey = own.public.encode()
    sock.curve_serverkey = server_public.encode()


_SEND = zmq.backend.Socket.send  # pyzmq's own, below its Python layer
_RECV = zmq.backend.Socket.recv
_MORE = int(zmq.SNDMORE)


def send_frames(sock: zmq.Socket[Any], frames: list[Any], flags: int = 0) -> None:
    """`sock.send_multipart(frames, flags, copy=False)` (the same copy threshold), without
    pyzmq's Python layer: its checks and enum arithmetic per frame cost ~2 us of a small
    frame's ~3 (34 frames: 108 -> 35 us to send). A multipart message is atomic: once its
    first frame is taken, so are the others."""
    flags = int(flags)
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _SEND(sock, frame, flags | _MORE if i < last else flags, False, False)


def recv_frames(sock: zmq.Socket[Any], flags: int = 0) -> list[Any]:
    """`sock.recv_multipart(flags, copy=False)`: Frames, read without pyzmq's Python layer
    (a `getsockopt` per frame to learn whether more follow)."""
    flags = int(flags)
    parts = [_RECV(sock, flags, False, False)]
    while parts[-1].more:
        parts.append(_RECV(sock, flags, False, False))
    return parts


def user_id(frame: Any) -> str | None:
    """The name the ZAP handler gave the connection a received frame came on."""
    try:
        value = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
    return value if isinstance(value, str) else None


class Gatekeeper(ThreadAuthenticator):
    """The ZAP handler of one process's context: admits CURVE clients whose public key is in
    `names` (public key -> actor name) and makes that name the connection's User-Id.
    `num_refused` counts the keys it turned away."""

    def __init__(self, context: zmq.Context[Any], names: dict[str, str]) -> None:
        super().__init__(context)
        self.names = {k.encode(): v for k, v in names.items()}
        self.num_refused = 0
        self.configure_curve_callback(ZAP_DOMAIN, self)  # pyzmq matches the domain exactly

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.names:
            return True
        self.num_refused += 1
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names[z85.encode(client_public_key)]

    def stop(self) -> None:
        """Stop the handler's thread, waiting for it 2 s at most."""
        if self.pipe is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.pipe.send(b"TERMINATE", zmq.NOBLOCK)
            if self.thread is not None:
                self.thread.join(timeout=2)
            self.thread = None  # type: ignore[assignment]
            self.pipe.close(linger=0)
            self.pipe = None  # type: ignore[assignment]
        if self.zap_socket is not None:
            self.zap_socket.close(linger=0)
            self.zap_socket = None  # type: ignore[assignment]


# -- fault injection -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Faults:
    """Faults an actor injects into its outgoing data plane (see the module docstring)."""

    drop: float = 0.0  # probability that a message is dropped
    delay: float = 0.0  # seconds: each message is held for uniform [0, delay]
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop <= 1.0:
            raise ValueError(f"faults: drop must be a probability in [0, 1], got {self.drop}")
        if not 0.0 <= self.delay <= 60.0:
            raise ValueError(f"faults: delay must be in [0, 60] seconds, got {self.delay}")

    @property
    def active(self) -> bool:
        return self.drop > 0 or self.delay > 0

    @staticmethod
    def parse(text: str) -> Faults:
        """"drop=0.05,delay=0.02,seed=3" (every part optional; "" is no faults)."""
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in ("drop", "delay", "seed") or key in values:
                raise ValueError(f"faults: bad part {part!r} in {text!r}; expected "
                                 f"drop=P,delay=SECONDS,seed=N")
            try:
                values[key] = int(raw) if key == "seed" else float(raw)
            except ValueError:
                raise ValueError(f"faults: {key} must be a number, got {raw!r}") from None
        return Faults(**values)


class PeerLinks:
    """An actor's PUSH sockets to its peers' data sockets (CURVE clients of each), with
    `faults` injected into what it sends. `count(reason)` hears of every message dropped.

        connect({name: address})   connect to new peers and to moved (restarted) ones
        send(to, frames)           now, later (a delay fault) or never (a drop fault)
        send_due()                 send the delayed messages whose time has come
        wait_ms()                  how long an idle caller may block: until the next is due

    A send waits SEND_TIMEOUT_MS at most for a peer that takes nothing (stopped, or dead and
    not yet replaced); after that, sends to it drop at once until it takes one again.
    """

    def __init__(self, ctx: zmq.Context[Any], name: str, keys: PlaneKeys, faults: Faults,
                 count: Callable[[str], None]) -> None:
        self.ctx = ctx
        self.name = name
        self.keys = keys
        self.faults = faults
        self.count = count
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self.addresses: dict[str, str] = {}
        self.stuck: set[str] = set()  # peers a send timed out to: until they move, no waiting
        self.rng = random.Random(f"{faults.seed}:{name}")
        self.delayed: list[tuple[float, int, str, list[Any]]] = []  # (due, n, peer, frames)
        self.numbers = itertools.count()

    def connect(self, addresses: dict[str, str]) -> None:
        for name, address in addresses.items():
            server_key = self.keys.actors.get(name)
            if name == self.name or server_key is None or self.addresses.get(name) == address:
                continue  # an unchanged peer keeps its connection and what it has queued
            old = self.sockets.pop(name, None)
            if old is not None:
                old.close(linger=0)
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            connect_curve(sock, self.keys.own, server_key)
            sock.connect(address)
            self.sockets[name] = sock
            self.addresses[name] = address
            self.stuck.discard(name)

    def send(self, to: str, frames: list[Any]) -> None:
        if not self.faults.active:
            self._push(to, frames)
        elif self.rng.random() < self.faults.drop:
            self.count("fault_drop")
        elif self.faults.delay > 0:
            due = time.monotonic() + self.rng.uniform(0.0, self.faults.delay)
            heapq.heappush(self.delayed, (due, next(self.numbers), to, frames))
        else:
            self._push(to, frames)

    def send_due(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            _, _, to, frames = heapq.heappop(self.delayed)
            self._push(to, frames)

    def wait_ms(self) -> int | None:
        if not self.delayed:
            return None
        return max(1, int((self.delayed[0][0] - time.monotonic()) * 1000) + 1)

    def _push(self, to: str, frames: list[Any]) -> None:
        sock = self.sockets.get(to)
        if sock is None:
            log.warning("%s: no connection to %s; a message dropped", self.name, to)
            self.count("no_peer")
            return
        try:
            send_frames(sock, frames, zmq.NOBLOCK if to in self.stuck else 0)
            self.stuck.discard(to)
        except zmq.Again:
            if to not in self.stuck:
                log.warning("%s: %s took no data for %.0f s; dropping what it cannot take",
                            self.name, to, SEND_TIMEOUT_MS / 1000)
            self.stuck.add(to)
            self.count("send_timeout")

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()


def is_loopback(address: str) -> bool:
    """True when only this machine can connect to `address` (a zmq endpoint)."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or ";" in rest:  # ";" names a source address: not a plain bind
        return False
    host, sep, port = rest.rpartition(":")
    if not sep or not port:
        return False
    if host == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name
        return False
