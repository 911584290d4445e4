"""An actor as its own process: the ActorCore behind a thin async shell over ZeroMQ.

    python -m moeflow.actors.process '<ActorConfig as JSON>'

Sockets (loopback by default, TCP in general):
    control   DEALER, identity = the actor's name, connected to the coordinator's ROUTER:
              RunUnit / Release / Abort / Peers / Shutdown in; UnitPart / RoutingCounts /
              NodeFailed / Heartbeat / Hello out
    data      PULL, bound by this actor: Data and Done from peers
    peers     one PUSH per peer, connected to its data socket

Threads: the shell's event loop (uvloop, structured with asyncio.TaskGroup) owns every
socket and never computes; one core thread owns the ActorCore and the device worker: it
loads the weights, runs nodes and encodes outgoing messages, so heartbeats go on while a
long prefill runs. All torch work stays on that one thread on purpose: torch's CPU kernels
use OpenMP, whose thread team belongs to the thread that first runs a parallel region, and
a second team in the same process (here, on 2 cores) halves weight-streaming speed.
The process exits when told, on SIGINT/SIGTERM, or within a heartbeat of its parent dying,
so none is left behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import zmq
import zmq.asyncio

from moeflow.actors.messages import (
    KINDS, Data, Done, Heartbeat, Hello, MessageError, Peers, Shutdown, decode, encode,
)

log = logging.getLogger("moeflow.actor")


@dataclass(frozen=True)
class ActorConfig:
    name: str
    model_dir: str
    dtype: str
    devices: tuple[str, ...]
    expert_owners: tuple[int, ...]
    kv_tokens: int
    threads: int
    coordinator: str
    host: str = "127.0.0.1"
    heartbeat_s: float = 0.2
    serves: bool = True  # holds dense weights and serves requests

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> ActorConfig:
        data = json.loads(text)
        data["devices"] = tuple(data["devices"])
        data["expert_owners"] = tuple(data["expert_owners"])
        return ActorConfig(**data)


class CoreThread(threading.Thread):
    """Builds the ActorCore, then serves the data plane: receives Data/Done from peers on
    its PULL socket and control messages from the shell on an inproc socket, runs ready
    nodes, and sends to peers itself. All torch work of the process is on this thread, and
    data never waits for a second thread to be scheduled."""

    def __init__(self, config: ActorConfig, ctx: zmq.Context[Any], control_in: str,
                 post_control: Any) -> None:
        super().__init__(name=f"core-{config.name}", daemon=True)
        self.config = config
        self.ctx = ctx
        self.control_in = control_in
        self.post_control = post_control  # thread-safe: frames for the coordinator
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.data_address = ""
        self.peers: dict[str, zmq.Socket[Any]] = {}

    def run(self) -> None:
        inbox = self.ctx.socket(zmq.PAIR)
        inbox.connect(self.control_in)
        data = self.ctx.socket(zmq.PULL)
        data.setsockopt(zmq.LINGER, 0)
        port = data.bind_to_random_port(f"tcp://{self.config.host}")
        self.data_address = f"tcp://{self.config.host}:{port}"
        try:
            self.core = build_core(self.config)
        except BaseException as exc:  # reported by the shell, which then exits
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        poller.register(data, zmq.POLLIN)
        try:
            while self._serve(poller, inbox, data):
                pass
        except BaseException:
            log.exception("%s: the core thread failed", self.config.name)
            raise
        finally:
            for sock in (inbox, data, *self.peers.values()):
                sock.close(linger=0)

    def _serve(self, poller: zmq.Poller, inbox: zmq.Socket[Any], data: zmq.Socket[Any]) -> bool:
        tasks = self.core.next_tasks()
        for group in tasks:
            self.core.start(group)
            try:
                values = self.core.run(group)
            except Exception as exc:
                for task in group:
                    self._send(self.core.fail(task, exc))
            else:
                for task, value in zip(group, values):
                    self._send(self.core.finish(task, value))
        events = dict(poller.poll(0 if tasks else None))
        if data in events:
            while True:
                try:
                    parts = data.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._deliver(parts, data_plane=True)
        if inbox in events:
            while True:
                try:
                    parts = inbox.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if not parts[0].bytes:
                    return False  # the shell is stopping
                self._deliver(parts, data_plane=False)
        return True

    def _deliver(self, parts: list[Any], data_plane: bool) -> None:
        try:
            msg = decode(parts)
        except MessageError as exc:
            log.warning("%s: dropped a malformed message: %s", self.config.name, exc)
            return
        if data_plane and not isinstance(msg, (Data, Done)):
            log.warning("%s: dropped a %s on the data socket", self.config.name,
                        type(msg).__name__)
            return
        if isinstance(msg, Peers):
            self._connect_peers(msg.addresses)
            return
        try:
            self._send(self.core.handle(msg))
        except Exception as exc:  # a well-formed message that makes no sense here
            log.warning("%s: dropped %s: %r", self.config.name, type(msg).__name__, exc)

    def _connect_peers(self, addresses: dict[str, str]) -> None:
        for name, address in addresses.items():
            if name == self.config.name:
                continue
            old = self.peers.pop(name, None)
            if old is not None:
                old.close(linger=0)
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self.peers[name] = sock

    def _send(self, outgoing: list[Any]) -> None:
        for out in outgoing:
            frames = encode(out.msg)
            if out.to == "":
                self.post_control(frames)
                continue
            sock = self.peers.get(out.to)
            if sock is None:
                log.warning("%s: no connection to %s; %s dropped", self.config.name, out.to,
                            type(out.msg).__name__)
                continue
            sock.send_multipart(frames, copy=False)


class ActorShell:
    """The async control plane: the coordinator's socket, heartbeats and lifecycle."""

    def __init__(self, config: ActorConfig) -> None:
        self.config = config
        self.ctx = zmq.asyncio.Context()
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, config.name.encode())
        self.control.setsockopt(zmq.LINGER, 0)
        self.to_core = self.ctx.socket(zmq.PAIR)
        self.to_core_address = f"inproc://core-{config.name}"
        self.to_core.bind(self.to_core_address)
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.stopping = asyncio.Event()

    async def serve(self) -> None:
        self.control.connect(self.config.coordinator)
        loop = asyncio.get_running_loop()
        sync_ctx: zmq.Context[Any] = zmq.Context.shadow(self.ctx.underlying)
        thread = CoreThread(self.config, sync_ctx, self.to_core_address,
                            lambda frames: loop.call_soon_threadsafe(self.outbox.put_nowait,
                                                                     frames))
        thread.start()
        await asyncio.to_thread(thread.ready.wait)
        if thread.error is not None:
            raise thread.error
        await self.control.send_multipart(
            encode(Hello(self.config.name, thread.data_address, os.getpid())))
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._receive())
                tasks.create_task(self._send_out())
                tasks.create_task(self._heartbeat())
                tasks.create_task(self._stop_when_told())
                tasks.create_task(self._watch(thread))
        finally:
            await self.to_core.send(b"")  # tells the core thread to stop
            thread.join(timeout=5)
            for sock in (self.control, self.to_core):
                sock.close(linger=0)
            self.ctx.term()

    async def _watch(self, thread: CoreThread) -> None:
        """If the core thread dies, so does the process (the coordinator then restarts it)."""
        await asyncio.to_thread(thread.join)
        if not self.stopping.is_set():
            raise RuntimeError(f"{self.config.name}: the core thread died")

    async def _stop_when_told(self) -> None:
        await self.stopping.wait()
        raise _Stop()

    async def _receive(self) -> None:
        while True:
            parts = await self.control.recv_multipart(copy=False)
            if len(parts) == 2 and parts[0].bytes == bytes([KINDS[Shutdown]]):
                self.stopping.set()
                continue
            if not parts or not parts[0].bytes:
                log.warning("%s: dropped an empty message", self.config.name)
                continue
            await self.to_core.send_multipart(parts, copy=False)

    async def _send_out(self) -> None:
        while True:
            frames = await self.outbox.get()
            await self.control.send_multipart(frames, copy=False)

    async def _heartbeat(self) -> None:
        """Heartbeats to the coordinator; and if this process was orphaned (its parent died
        without shutting it down), stop. PR_SET_PDEATHSIG cannot do this: it fires when
        the parent's spawning *thread* exits, which a restart from a worker thread does."""
        parent = os.getppid()
        while True:
            if os.getppid() != parent:
                log.warning("%s: the parent process is gone; exiting", self.config.name)
                self.stopping.set()
                return
            await self.control.send_multipart(encode(Heartbeat(self.config.name, time.time())))
            await asyncio.sleep(self.config.heartbeat_s)


class _Stop(Exception):
    pass


def build_core(config: ActorConfig) -> Any:
    import torch

    from moeflow.actors.core import ActorCore
    from moeflow.actors.inproc import load_worker
    from moeflow.dataflow.graph import Placement
    from moeflow.models.families import load_spec
    from moeflow.models.weights import torch_dtype

    torch.set_num_threads(config.threads)
    spec = load_spec(config.model_dir)
    placement = Placement(config.devices, config.expert_owners)
    worker = load_worker(config.model_dir, spec, placement, config.name,
                         torch_dtype(config.dtype), config.kv_tokens)
    return ActorCore(config.name, worker)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("MOEFLOW_LOG", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ActorConfig.from_json(argv[1])
    # the socket thread must get the GIL back quickly while the core thread runs Python
    # between ops: a message waits up to one switch interval (5 ms by default) per hop
    sys.setswitchinterval(float(os.environ.get("MOEFLOW_SWITCH_INTERVAL", "0.0002")))
    signal.signal(signal.SIGTERM, _interrupt)  # SIGINT already raises KeyboardInterrupt
    try:
        import uvloop

        uvloop.run(ActorShell(config).serve())
    except* (_Stop, KeyboardInterrupt):
        pass  # told to stop, or interrupted: a clean exit either way
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
