"""The coordinator: actor processes over ZeroMQ, driven from the engine's process.

    executor = ZmqExecutor(model_dir, spec, placement, "bfloat16", kv_tokens=65536)
    executor.run_many(jobs)    # or submit() / poll()
    executor.close()

It binds a ROUTER (loopback by default) and starts one actor process per device (torch
threads split so the total stays within the cores). Each actor says Hello with its data
address; the coordinator tells everyone their peers. A unit's whole plan goes to each
actor that runs part of it in one RunUnit message; the actors exchange tensors directly
and send back only UnitPart (sampled token ids), routing counts and heartbeats.

Faults: a poll checks every actor's process and its last heartbeat. A dead or silent
actor fails the jobs it was part of (with a clear error, within `heartbeat_timeout` at
most), the other actors drop those units, and the actor is restarted for later work; its
KV cache is gone, so results report it in `lost` and the engine fails the requests it
served. Malformed messages are logged and dropped. `close()` stops every process (asking,
then terminating, then killing) so none is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import zmq

from moeflow.actors.cluster import JobResult, JobSpec, JobTracker, plan_actors, run_jobs
from moeflow.actors.kvcache import DEFAULT_BLOCK_SIZE
from moeflow.actors.messages import (
    Abort, Heartbeat, Hello, MessageError, NodeFailed, Peers, Release, RoutingCounts, RunUnit,
    Shutdown, UnitPart, decode, encode,
)
from moeflow.actors.process import ActorConfig
from moeflow.dataflow.graph import Placement

log = logging.getLogger("moeflow.coordinator")


class ActorStartError(RuntimeError):
    pass


@dataclass
class _Actor:
    config: ActorConfig
    proc: subprocess.Popen[bytes]
    data_address: str | None = None
    last_seen: float = 0.0


class ZmqExecutor:
    def __init__(self, model_dir: str, placement: Placement, dtype: str, kv_tokens: int, *,
                 host: str = "127.0.0.1", threads: int | None = None,
                 start_timeout: float = 300.0, heartbeat_timeout: float = 10.0,
                 heartbeat_s: float = 0.2, want_logits: bool = False,
                 record_routing: bool = False) -> None:
        self.model_dir = str(model_dir)
        self.placement = placement
        self.dtype = dtype
        self.kv_tokens = kv_tokens
        self.host = host
        self.start_timeout = start_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_s = heartbeat_s
        self.want_logits = want_logits
        self.routing: dict[int, list[int]] | None = {} if record_routing else None
        cores = threads or os.cpu_count() or 1
        n = len(placement.devices)
        self.threads = max(1, cores // n)
        if n > cores:
            log.warning("%d actors on %d cores: each gets 1 torch thread", n, cores)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        port = self.router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self.tracker = JobTracker()
        self.actors: dict[str, _Actor] = {}
        self.lost: set[str] = set()
        self.done: list[JobResult] = []
        self.closed = False
        try:
            for name in placement.devices:
                self.actors[name] = self._spawn(name)
            self._await_hellos(set(self.actors))
        except BaseException:
            self.close()
            raise

    # -- processes -----------------------------------------------------------------

    def _spawn(self, name: str) -> _Actor:
        config = ActorConfig(name, self.model_dir, self.dtype, self.placement.devices,
                             self.placement.expert_owners, self.kv_tokens, self.threads,
                             self.address, self.host, self.heartbeat_s)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        proc = subprocess.Popen([sys.executable, "-m", "moeflow.actors.process",
                                 config.to_json()], stdin=subprocess.DEVNULL, env=env)
        return _Actor(config, proc, last_seen=time.monotonic())

    def _await_hellos(self, names: set[str]) -> None:
        deadline = time.monotonic() + self.start_timeout
        waiting = set(names)
        while waiting:
            for name in waiting:
                code = self.actors[name].proc.poll()
                if code is not None:
                    raise ActorStartError(f"actor {name} exited with code {code} while starting")
            if time.monotonic() > deadline:
                raise ActorStartError(f"actors {sorted(waiting)} did not start within "
                                      f"{self.start_timeout:.0f}s")
            if self.router.poll(100):
                msg, name = self._receive()
                if isinstance(msg, Hello) and name in waiting and msg.actor == name:
                    self.actors[name].data_address = msg.data_address
                    self.actors[name].last_seen = time.monotonic()
                    waiting.discard(name)
                elif msg is not None:
                    self._dispatch(msg, name)
        peers = Peers({n: a.data_address for n, a in self.actors.items()
                       if a.data_address is not None})
        for name in self.actors:
            self._send(name, peers)

    def _send(self, name: str, msg: object) -> None:
        with contextlib.suppress(zmq.ZMQError):  # an unreachable actor is caught by liveness
            self.router.send_multipart([name.encode(), *encode(msg)], copy=False)  # type: ignore[arg-type]

    def _receive(self) -> tuple[object | None, str]:
        parts = self.router.recv_multipart(copy=False)
        name = parts[0].bytes.decode(errors="replace")
        try:
            return decode(parts[1:]), name
        except MessageError as exc:
            log.warning("dropped a malformed message from %r: %s", name, exc)
            return None, name

    # -- the executor interface ----------------------------------------------------

    @property
    def kv_block_size(self) -> int:
        return DEFAULT_BLOCK_SIZE

    def kv_capacity_blocks(self) -> dict[str, int]:
        return {d: self.kv_tokens // DEFAULT_BLOCK_SIZE for d in self.placement.devices}

    def submit(self, job: JobSpec) -> None:
        actors = plan_actors(job.plan)
        unknown = actors - set(self.actors)
        if unknown:
            raise ValueError(f"the plan uses actors {sorted(unknown)} this executor lacks")
        self.tracker.start(job.job_id, actors)
        frames = encode(RunUnit(job.job_id, job.plan, job.tokens, job.sampling,
                                self.want_logits))
        for name in sorted(actors):
            with contextlib.suppress(zmq.ZMQError):
                self.router.send_multipart([name.encode(), *frames], copy=False)

    def poll(self, timeout: float | None = None) -> list[JobResult]:
        """Results of finished jobs: wait up to `timeout` seconds (None: until one)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            wait_ms = 50
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait_ms = max(1, min(wait_ms, int(left * 1000)))
            if self.router.poll(wait_ms):
                while self.router.poll(0):
                    msg, name = self._receive()
                    if msg is not None:
                        self._dispatch(msg, name)
            self._check_liveness()
            if deadline is None and not len(self.tracker) and not self.done:
                break
        done, self.done = self.done, []
        if done and self.lost:
            done[0].lost = tuple(sorted(self.lost))
            self.lost.clear()
        return done

    def run_many(self, jobs: list[JobSpec]) -> list[JobResult]:
        return run_jobs(self, jobs)

    def release(self, home: str, seq_id: int) -> None:
        self._send(home, Release((seq_id,)))

    # -- inbound -------------------------------------------------------------------

    def _dispatch(self, msg: object, name: str) -> None:
        actor = self.actors.get(name)
        if actor is None:
            log.warning("dropped a %s from unknown peer %r", type(msg).__name__, name)
            return
        actor.last_seen = time.monotonic()
        if isinstance(msg, UnitPart):
            result = self.tracker.part(msg.unit_id, msg.actor, msg.tokens, msg.logits)
            if result is not None:
                self.done.append(result)
        elif isinstance(msg, NodeFailed):
            self._fail([msg.unit_id], f"{msg.actor}: {msg.error}")
        elif isinstance(msg, RoutingCounts):
            if self.routing is not None:
                total = self.routing.setdefault(msg.layer, [0] * len(msg.counts))
                for e, c in enumerate(msg.counts):
                    total[e] += c
        elif not isinstance(msg, (Heartbeat, Hello)):
            log.warning("dropped an unexpected %s from %s", type(msg).__name__, name)

    def _fail(self, unit_ids: list[int], error: str) -> None:
        failed = []
        for unit_id in unit_ids:
            result = self.tracker.fail(unit_id, error)
            if result is not None:
                self.done.append(result)
                failed.append(unit_id)
        if failed:
            for name in self.actors:
                self._send(name, Abort(tuple(failed)))

    # -- faults --------------------------------------------------------------------

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for name, actor in list(self.actors.items()):
            code = actor.proc.poll()
            if code is not None:
                self._restart(name, f"its process exited with code {code}")
            elif now - actor.last_seen > self.heartbeat_timeout:
                self._restart(name, f"no heartbeat for {now - actor.last_seen:.1f}s")

    def _restart(self, name: str, why: str) -> None:
        log.error("actor %s died (%s); restarting it", name, why)
        old = self.actors[name]
        with contextlib.suppress(OSError):
            old.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            old.proc.wait(timeout=5)
        self._fail(self.tracker.involving(name), f"actor {name} died ({why})")
        self.lost.add(name)
        self.actors[name] = self._spawn(name)
        self._await_hellos({name})

    def pids(self) -> dict[str, int]:
        return {name: a.proc.pid for name, a in self.actors.items()}

    def close(self) -> None:
        """Stop every actor process and wait for it: ask, then terminate, then kill."""
        if self.closed:
            return
        self.closed = True
        for name in self.actors:
            self._send(name, Shutdown())
        deadline = time.monotonic() + 5
        for actor in self.actors.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                actor.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for actor in self.actors.values():
            if actor.proc.poll() is None:
                actor.proc.terminate()
                try:
                    actor.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    actor.proc.kill()
                    actor.proc.wait(timeout=5)
        self.router.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> ZmqExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
