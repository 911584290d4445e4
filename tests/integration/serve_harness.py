"""A `moeflow serve` subprocess and a client written from docs/protocol.md alone (raw pyzmq
DEALER + msgpack), shared by the tests that drive a real server."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

STARTUP_S = 120.0


class Server:
    """A `moeflow serve` subprocess; stop() sends SIGTERM and expects a clean exit."""

    def __init__(self, model: Path, log: Path, *args: str,
                 bind: str | None = "tcp://127.0.0.1:*"):
        self.log = log
        where = ["--bind", bind] if bind is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moeflow", "serve", str(model), *where, *args],
            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], STARTUP_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("serving "):
            self.kill()
            raise AssertionError(f"the server did not start: {line!r}\n{log.read_text()}")
        self.ready_line = line.strip()
        self.address = line.split(" on ", 1)[1].split(" ", 1)[0]
        # with --http: the OpenAI-compatible front end's base URL
        self.http_url = next((w.rstrip(",)") for w in line.split() if w.startswith("http://")
                              and "/metrics" not in w), None)
        self.metrics_url = (line.split("metrics ", 1)[1].split(",")[0].rstrip(")\n")
                            if "metrics http" in line else None)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server ignored SIGTERM\n{self.log.read_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class RawClient:
    """A client from docs/protocol.md: one DEALER, one msgpack map per frame, replies
    matched by id."""

    def __init__(self, address: str, **sockopts: Any) -> None:
        self.socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # a DEALER blocks on send until a connection is up: never wait on that forever
        self.socket.setsockopt(zmq.SNDTIMEO, 30_000)
        for name, value in sockopts.items():
            setattr(self.socket, name, value)
        self.socket.connect(address)
        self.pending: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.socket.send(msgpack.packb(message))

    def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        if not self.socket.poll(int(timeout * 1000)):
            raise TimeoutError("no reply")
        return msgpack.unpackb(self.socket.recv_multipart()[-1])

    def next_for(self, request_id: Any, kinds: tuple[str, ...] = (), timeout: float = 30.0
                 ) -> dict[str, Any]:
        """The next reply with this id (and one of `kinds`), keeping others for later."""
        def match(m: dict[str, Any]) -> bool:
            return m.get("id") == request_id and (not kinds or m["type"] in kinds)
        for i, m in enumerate(self.pending):
            if match(m):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(max(0.001, deadline - time.monotonic()))
            if match(m):
                return m
            self.pending.append(m)

    def ask(self, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send a request; its first reply."""
        self.send(message)
        if "id" in message:
            return self.next_for(message["id"], timeout=timeout)
        return self.next_for(None, (message["type"], "error"), timeout=timeout)

    def generate(self, request_id: Any, **fields: Any) -> list[dict[str, Any]]:
        """Every reply of one generate, through its final (or error)."""
        self.send({"type": "generate", "id": request_id, **fields})
        out = [self.next_for(request_id, ("token", "final", "error"))]
        while out[-1]["type"] == "token":
            out.append(self.next_for(request_id, ("token", "final", "error")))
        return out

    def close(self) -> None:
        self.socket.close(linger=0)


def wait_idle(client: RawClient, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = client.ask({"type": "health"})
        if health["running"] == health["waiting"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.05)
