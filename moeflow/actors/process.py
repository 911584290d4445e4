"""An actor as its own process: the ActorCore behind a thin async shell over ZeroMQ.

    python -m moeflow.actors.process NAME  < launch message on stdin (see `launch_message`)

The coordinator writes the ActorConfig and the actor's CURVE keys to the child's stdin
pipe and closes it: no secret is on a command line or in the environment.

Sockets, every one CURVE-encrypted and authenticated (see moeflow.actors.plane); `ipc://`
in the launch's private directory on one host, TCP across hosts:
    control   DEALER, identity = the actor's name, connected to the coordinator's ROUTER:
              RunUnit / Release / Abort / Peers / Shutdown in; UnitPart / RoutingCounts /
              NodeFailed / Heartbeat / Hello out
    data      PULL, bound by this actor: Data and Done from peers (only peers' keys pass)
    peers     one PUSH per peer, connected to its data socket

Threads: the shell's event loop (uvloop, structured with asyncio.TaskGroup) owns the
control socket and never computes; one core thread owns the ActorCore and the device
worker: it loads the weights, runs nodes and encodes outgoing messages, so heartbeats go
on while a long prefill runs. All torch work stays on that one thread on purpose: torch's
CPU kernels use OpenMP, whose thread team belongs to the thread that first runs a parallel
region, and a second team in the same process (here, on 2 cores) halves weight-streaming
speed. Each heartbeat carries the core thread's progress (steps done, how long the current
one has run), which the coordinator watches for a wedged core or a stalled job.

The process exits when told, on SIGTERM, within a heartbeat of its parent dying, or
promptly when its core thread dies; every shutdown step is bounded, so none is left behind.
It ignores SIGINT: a terminal's Ctrl-C reaches the whole process group, and the engine's
process, which gets it too, decides what stops.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import IO, Any

import zmq
import zmq.asyncio

from moeflow.actors.messages import (
    KINDS, Data, Done, Heartbeat, Hello, MessageError, Peers, Shutdown, decode_all, encode,
    encode_many,
)
from moeflow.actors.plane import (
    Faults, Gatekeeper, PeerLinks, PlaneKeys, connect_curve, ipc_address, recv_frames,
    remove_runtime_dir, serve_curve,
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
    runtime_dir: str = ""  # the launch's private directory for ipc sockets; "": TCP on host
    faults: str = ""  # injected into outgoing data messages: see moeflow.actors.plane.Faults
    null_ops: bool = False  # a NullWorker: every node instant, only the runtime's cost left
    scheduler: str = ""  # base64 of a pickled scheduler whose on_routing runs here, or ""

    def __post_init__(self) -> None:
        Faults.parse(self.faults)

    @staticmethod
    def from_plain(data: dict[str, Any]) -> ActorConfig:
        data = dict(data, devices=tuple(data["devices"]),
                    expert_owners=tuple(data["expert_owners"]))
        return ActorConfig(**data)


def launch_message(config: ActorConfig, keys: PlaneKeys) -> bytes:
    """What the coordinator writes to a new actor's stdin."""
    return json.dumps({"config": asdict(config), "keys": keys.to_plain()}).encode()


def read_launch(stream: IO[bytes]) -> tuple[ActorConfig, PlaneKeys]:
    data = json.loads(stream.read())
    return ActorConfig.from_plain(data["config"]), PlaneKeys.from_plain(data["keys"])


class CoreThread(threading.Thread):
    """Builds the ActorCore, then serves the data plane: receives Data/Done from peers on
    its PULL socket and control messages from the shell on an inproc socket, runs ready
    nodes, and sends to peers itself. All torch work of the process is on this thread, and
    data never waits for a second thread to be scheduled.

    Progress, read by the shell from another thread (plain attributes, so no lock):
    `num_done` counts finished steps (a node group run, a message handled) and
    `running_since` is when the current step began (monotonic; 0.0 while it waits for
    work)."""

    def __init__(self, config: ActorConfig, keys: PlaneKeys, ctx: zmq.Context[Any],
                 control_in: str, post_control: Any) -> None:
        super().__init__(name=f"core-{config.name}", daemon=True)
        self.config = config
        self.keys = keys
        self.ctx = ctx
        self.control_in = control_in
        self.post_control = post_control  # thread-safe: frames for the coordinator
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.data_address = ""
        self.core: Any = None
        self.num_done = 0
        self.running_since = time.monotonic()
        self.dropped: dict[str, int] = {}
        self.peers = PeerLinks(ctx, config.name, keys, Faults.parse(config.faults), self._count)

    def run(self) -> None:
        inbox = self.ctx.socket(zmq.PAIR)
        inbox.connect(self.control_in)
        data = self.ctx.socket(zmq.PULL)
        data.setsockopt(zmq.LINGER, 0)
        try:
            serve_curve(data, self.keys.own)
            if self.config.runtime_dir:
                self.data_address = ipc_address(self.config.runtime_dir,
                                                f"{self.config.name}-{os.getpid()}.data")
                data.bind(self.data_address)
            else:
                port = data.bind_to_random_port(f"tcp://{self.config.host}")
                self.data_address = f"tcp://{self.config.host}:{port}"
            self.core = build_core(self.config)
        except BaseException as exc:  # reported by the shell, which then exits
            self.error = exc
            self.ready.set()
            for sock in (inbox, data):
                sock.close(linger=0)
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
            for sock in (inbox, data):
                sock.close(linger=0)
            self.peers.close()

    def _serve(self, poller: zmq.Poller, inbox: zmq.Socket[Any], data: zmq.Socket[Any]) -> bool:
        tasks = self.core.start_tasks()
        for group in tasks:
            self.running_since = time.monotonic()
            out = []  # what a group sends goes out together, a batch per destination
            try:
                values = self.core.run(group)
            except Exception as exc:
                for task in group:
                    out.extend(self.core.fail(task, exc))
            else:
                for task, value in zip(group, values):
                    out.extend(self.core.finish(task, value))
            self._send(out)
            self.num_done += 1
        self.peers.send_due()
        if tasks:
            events = dict(poller.poll(0))
        else:
            self.running_since = 0.0
            events = dict(poller.poll(self.peers.wait_ms()))
        if events:  # a wake-up with nothing received is not a step: it stays idle
            self.running_since = time.monotonic()
        # control first: a unit's RunUnit is admitted before the data its peers sent for it
        if inbox in events:
            while True:
                try:
                    parts = recv_frames(inbox, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if not parts[0].bytes:
                    return False  # the shell is stopping
                self._deliver(parts, data_plane=False)
        if data in events:
            while True:
                try:
                    parts = recv_frames(data, zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._deliver(parts, data_plane=True)
        return True

    def _count(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def _deliver(self, parts: list[Any], data_plane: bool) -> None:
        self.num_done += 1
        try:
            msgs = decode_all(parts)
        except MessageError as exc:
            log.warning("%s: dropped a malformed message: %s", self.config.name, exc)
            self._count("malformed")
            return
        for msg in msgs:
            self._deliver_one(msg, data_plane)

    def _deliver_one(self, msg: Any, data_plane: bool) -> None:
        if data_plane and not isinstance(msg, (Data, Done)):
            log.warning("%s: dropped a %s on the data socket", self.config.name,
                        type(msg).__name__)
            self._count("wrong_socket")
            return
        if isinstance(msg, Peers):
            self.peers.connect(msg.addresses)
            return
        try:
            self._send(self.core.handle(msg))
        except Exception as exc:  # a well-formed message that makes no sense here
            log.warning("%s: dropped %s: %r", self.config.name, type(msg).__name__, exc)
            self._count("rejected")

    def _send(self, outgoing: list[Any]) -> None:
        """Each destination's messages, in order, as one batch."""
        by_destination: dict[str, list[Any]] = {}
        for out in outgoing:
            by_destination.setdefault(out.to, []).append(out.msg)
        for to, msgs in by_destination.items():
            if to == "":
                self.post_control(encode_many(msgs))
            else:
                self.peers.send(to, encode_many(msgs))

    def dropped_so_far(self) -> dict[str, int]:
        counts = dict(self.dropped)
        for reason, num in dict(getattr(self.core, "dropped", {})).items():
            counts[reason] = counts.get(reason, 0) + num
        return counts


class ActorShell:
    """The async control plane: the coordinator's socket, heartbeats and lifecycle."""

    def __init__(self, config: ActorConfig, keys: PlaneKeys) -> None:
        self.config = config
        self.keys = keys
        self.ctx = zmq.asyncio.Context()
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, config.name.encode())
        self.control.setsockopt(zmq.LINGER, 0)
        connect_curve(self.control, keys.own, keys.coordinator)
        self.to_core = self.ctx.socket(zmq.PAIR)
        self.to_core.setsockopt(zmq.LINGER, 0)
        self.to_core_address = f"inproc://core-{config.name}"
        self.to_core.bind(self.to_core_address)
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.stopping = asyncio.Event()
        self.thread: CoreThread | None = None
        self.gatekeeper: Gatekeeper | None = None

    async def serve(self) -> None:
        # only the cluster's actors may connect to this process's data socket
        gatekeeper = self.gatekeeper = Gatekeeper(
            self.ctx, {key: name for name, key in self.keys.actors.items()})
        gatekeeper.start()
        loop = asyncio.get_running_loop()
        sync_ctx: zmq.Context[Any] = zmq.Context.shadow(self.ctx.underlying)
        thread = self.thread = CoreThread(
            self.config, self.keys, sync_ctx, self.to_core_address,
            lambda frames: loop.call_soon_threadsafe(self.outbox.put_nowait, frames))
        try:
            self.control.connect(self.config.coordinator)
            thread.start()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._watch(thread))
                tasks.create_task(self._stop_when_told())
                tasks.create_task(self._watch_parent())
                tasks.create_task(self._send_out())
                while not thread.ready.is_set() or thread.error is not None:
                    await asyncio.sleep(0.05)  # _watch ends this if the core cannot start
                self.outbox.put_nowait(
                    encode(Hello(self.config.name, thread.data_address, os.getpid())))
                tasks.create_task(self._receive())
                tasks.create_task(self._heartbeat(thread))
        finally:
            if thread.is_alive():
                with contextlib.suppress(zmq.ZMQError):  # the core may be gone or busy
                    zmq.Socket.shadow(self.to_core.underlying).send(b"", zmq.NOBLOCK)
                thread.join(timeout=2)
            for sock in (self.control, self.to_core):
                sock.close(linger=0)
            gatekeeper.stop()
            if not thread.is_alive():  # else its sockets are open: term() would wait forever
                self.ctx.term()

    async def _watch(self, thread: CoreThread) -> None:
        """If the core thread dies, so does the process (the coordinator then restarts it)."""
        while thread.is_alive():  # polled: a thread blocked in join would outlive the loop
            await asyncio.sleep(0.05)
        if thread.error is not None:
            raise thread.error  # it could not start
        if not self.stopping.is_set():
            raise RuntimeError(f"{self.config.name}: the core thread died")

    async def _watch_parent(self) -> None:
        """Stop if this process was orphaned (its parent died without shutting it down).
        PR_SET_PDEATHSIG cannot do this: it fires when the parent's spawning *thread*
        exits, which a restart from a worker thread does."""
        parent = os.getppid()
        while os.getppid() == parent:
            await asyncio.sleep(self.config.heartbeat_s)
        log.warning("%s: the parent process is gone; exiting", self.config.name)
        if self.config.runtime_dir:  # the launch is over: nobody else will remove it
            remove_runtime_dir(self.config.runtime_dir)
        self.stopping.set()

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

    async def _heartbeat(self, thread: CoreThread) -> None:
        """Heartbeats to the coordinator, with the core thread's progress."""
        while True:
            since = thread.running_since
            running_s = time.monotonic() - since if since else 0.0
            dropped = thread.dropped_so_far()
            if self.gatekeeper is not None and self.gatekeeper.num_refused:
                dropped["refused_key"] = self.gatekeeper.num_refused
            beat = Heartbeat(self.config.name, time.time(), thread.num_done,
                             max(running_s, 0.0), dropped)
            await self.control.send_multipart(encode(beat))
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
    on_routing = None
    if config.scheduler:
        on_routing = pickle.loads(base64.b64decode(config.scheduler)).on_routing
    if config.null_ops:
        from moeflow.actors.null import NullWorker

        return ActorCore(config.name, NullWorker(config.name, spec, config.kv_tokens,  # type: ignore[arg-type]
                                                 config.serves), on_routing)
    worker = load_worker(config.model_dir, spec, placement, config.name,
                         torch_dtype(config.dtype), config.kv_tokens)
    return ActorCore(config.name, worker, on_routing)


# the exit code of an actor that failed on what it was given (a bad checkpoint: a
# ValueError, as moeflow.models' errors are), which no restart would mend
EXIT_BAD_INPUT = 2


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("MOEFLOW_LOG", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config, keys = read_launch(sys.stdin.buffer)
    # the socket thread must get the GIL back quickly while the core thread runs Python
    # between ops: a message waits up to one switch interval (5 ms by default) per hop
    sys.setswitchinterval(float(os.environ.get("MOEFLOW_SWITCH_INTERVAL", "0.0002")))
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C in a terminal goes to the whole process group: the engine's process decides
    # (it aborts the requests and goes on, or stops its actors); an actor that died of it
    # would be restarted, every request on it lost
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shell = ActorShell(config, keys)
    code = 0
    try:
        import uvloop

        uvloop.run(shell.serve())
    except* (_Stop, KeyboardInterrupt):
        pass  # told to stop, or interrupted: a clean exit either way
    except* Exception as group:
        log.error("%s: stopping: %s", config.name,
                  "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions))
        started = shell.thread is not None and shell.thread.core is not None
        code = (EXIT_BAD_INPUT if not started and all(
            isinstance(e, ValueError) for e in group.exceptions) else 1)
    if shell.thread is not None and shell.thread.is_alive():
        # a core thread stuck in a node would hold interpreter shutdown: leave at once
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
