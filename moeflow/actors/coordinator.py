"""The coordinator: actor processes over ZeroMQ, driven from the engine's process.

    executor = ZmqExecutor(model_dir, spec, placement, "bfloat16", kv_tokens=65536)
    executor.run_many(jobs)    # or submit() / poll()
    executor.close()

It binds a ROUTER and starts one actor process per device (torch
threads split so the total stays within the cores). Each actor says Hello with its data
address; the coordinator tells everyone their peers. A unit's whole plan goes to each
actor that runs part of it in one RunUnit message; the actors exchange tensors directly
and send back only UnitPart (sampled token ids) and heartbeats, and each gate's routing
counts when the coordinator records them (`record_routing`).

The plane is closed to other processes (see moeflow.actors.plane): on one host the ROUTER
and every actor's data socket are ipc:// sockets in a private 0700 directory of this
launch (TCP for a `host` other machines reach, or with ipc=False); every plane socket speaks
CURVE with keys made per launch, which the actors read from their stdin; a ZAP handler
admits only the actors' keys. The ROUTER keeps a name with its first connection (no
handover), and a message is dropped and counted in `dropped` (by reason) when its claimed
actor is not the one its routing identity and its key name, when it does not decode, or
when it belongs to no live job of that actor. The actors count what they drop in
`actor_dropped` (from their heartbeats).

Faults: a poll checks every actor's process and its heartbeats, which carry the progress
of the actor's core thread. A dead or silent actor (no heartbeat for `heartbeat_timeout`,
3 s by default), or a wedged one (its core on one step for `node_timeout`), fails the jobs
it was part of with a clear error, the other actors drop those units, and the actor is
restarted for later work; its KV cache is gone, so results report it in `lost`. Jobs
failed this way (and by a lost message) are marked `retry`: the engine runs their requests
again (see moeflow.serve.engine). A job that none of the actors still owing a share of
it has worked on for `stall_timeout` (no node finished and none running on any of them: a
message was lost) fails alone. Busy actors keep a job alive: a long node never looks like
a stall, and a stall shows once its actors fall idle. `close()` stops every process
(asking, then terminating, then killing) so none is left behind, and removes the directory.

Chaos: `faults="drop=0.05,delay=0.02,seed=3"` makes every actor drop or delay its outgoing
data messages (Data and Done to peers), seeded; see moeflow.actors.plane.Faults.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from moeflow.actors.cluster import (
    CoordinatorCore, JobResult, JobSpec, JobTracker, run_jobs,
)
from moeflow.actors.kvcache import DEFAULT_BLOCK_SIZE
from moeflow.actors.messages import (
    Abort, DropPlans, Heartbeat, Hello, MessageError, NodeFailed, Peers, Release,
    RoutingCounts, Shutdown, UnitPart, decode_all, encode, pack,
)
from moeflow.actors.plane import (
    Faults, Gatekeeper, KeyPair, PlaneKeys, ipc_address, is_loopback, make_runtime_dir,
    recv_frames, remove_runtime_dir, require_curve, send_frames, serve_curve, user_id,
)
from moeflow.actors.process import EXIT_BAD_INPUT, ActorConfig, launch_message
from moeflow.actors.tracing import RealTrace
from moeflow.dataflow.graph import Placement
from moeflow.ops.onednn_cache import bound_onednn_cache
from moeflow.scheduler.base import Scheduler, routes

log = logging.getLogger("moeflow.coordinator")


class ActorStartError(RuntimeError):
    pass


class ActorInputError(ActorStartError, ValueError):
    """An actor could not start on what it was given (a bad checkpoint): its error is on
    its stderr, and every retry would fail the same way."""


def _start_failed(name: str, code: int) -> ActorStartError:
    if code == EXIT_BAD_INPUT:
        return ActorInputError(f"actor {name} could not load what it was given (its error is "
                               f"above)")
    return ActorStartError(f"actor {name} exited with code {code} while starting")


@dataclass
class _Actor:
    config: ActorConfig
    proc: subprocess.Popen[bytes]
    data_address: str | None = None  # None until its Hello: starting
    spawned: float = 0.0
    last_seen: float = 0.0
    last_busy: float = 0.0  # when its core was last seen working
    num_done: int = 0  # its core's steps done, as of its last heartbeat
    running_s: float = 0.0  # how long its core's current step had run, as of then
    dropped: dict[str, int] = field(default_factory=dict)  # its own counts, by reason


class ZmqExecutor:
    """Jobs on actor processes (see the module docstring). `ipc` None: ipc:// sockets when
    `host` is loopback; `faults`: see moeflow.actors.plane.Faults; `scheduler`: the
    engine's, if its `on_routing` should pick the actors' expert kernels."""

    def __init__(self, model_dir: str, placement: Placement, dtype: str, kv_tokens: int, *,
                 host: str = "127.0.0.1", threads: int | None = None,
                 start_timeout: float = 300.0, heartbeat_timeout: float = 3.0,
                 heartbeat_s: float = 0.2, stall_timeout: float = 3.0,
                 node_timeout: float = 60.0, want_logits: bool = False,
                 record_routing: bool = False, ipc: bool | None = None,
                 faults: str = "", null_ops: bool = False,
                 trace: str | os.PathLike[str] | None = None,
                 scheduler: Scheduler | None = None) -> None:
        require_curve()
        Faults.parse(faults)
        # a scheduler with an on_routing: each actor runs its own copy, sent pickled through
        # the launch pipe (as trusted as the actor's code)
        self.scheduler = ""
        if scheduler is not None and routes(scheduler):
            if type(scheduler).__module__ == "__main__":
                raise ValueError(f"scheduler {type(scheduler).__name__} has an on_routing, "
                                 f"which actor processes run, but it is defined in __main__, "
                                 f"which they cannot import: define it in a module")
            try:
                self.scheduler = base64.b64encode(pickle.dumps(scheduler)).decode()
            except Exception as exc:
                raise ValueError(f"scheduler {scheduler.name or type(scheduler).__name__} has "
                                 f"an on_routing, which actor processes run, but it cannot "
                                 f"be pickled for them: {exc}") from None
        self.model_dir = str(model_dir)
        self.placement = placement
        self.dtype = dtype
        self.kv_tokens = kv_tokens
        self.host = host
        self.start_timeout = start_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_s = heartbeat_s
        self.stall_timeout = stall_timeout
        self.node_timeout = node_timeout
        self.faults = faults
        self.null_ops = null_ops  # NullWorkers: for measuring the runtime alone
        cores = threads or os.cpu_count() or 1
        n = len(placement.devices)
        self.threads = max(1, cores // n)
        if n > cores:
            log.warning("%d actors on %d cores: each gets 1 torch thread", n, cores)
        self.keys = KeyPair.make()
        self.actor_keys = {name: KeyPair.make() for name in placement.devices}
        self.coordinator = CoordinatorCore(placement.devices, want_logits, record_routing,
                                           None if trace is None else RealTrace(trace))
        self.started: dict[int, float] = {}  # job id -> when it was submitted
        self.actors: dict[str, _Actor] = {}
        self.lost: set[str] = set()
        self.restarts = 0  # actor processes restarted, and why the last one was
        self.last_restart: str | None = None
        self.dropped: dict[str, int] = {}  # messages the coordinator dropped, by reason
        self.outbox: dict[str, list[list[Any]]] = {}  # RunUnits submitted, not yet sent
        self.closed = False
        use_ipc = is_loopback(f"tcp://{host}:0") if ipc is None else ipc
        self.runtime_dir = make_runtime_dir() if use_ipc else ""
        self.ctx = zmq.Context()
        self.gatekeeper = Gatekeeper(self.ctx, {k.public: n for n, k in self.actor_keys.items()})
        self.router = self.ctx.socket(zmq.ROUTER)
        try:
            self.gatekeeper.start()
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.setsockopt(zmq.ROUTER_HANDOVER, 0)  # no one takes an actor's name over
            serve_curve(self.router, self.keys)
            if self.runtime_dir:
                self.address = ipc_address(self.runtime_dir, "coordinator")
                self.router.bind(self.address)
            else:
                port = self.router.bind_to_random_port(f"tcp://{host}")
                self.address = f"tcp://{host}:{port}"
            for name in placement.devices:
                self.actors[name] = self._spawn(name)
            self._await_ready(placement.devices)
        except BaseException:
            self.close()
            raise

    # -- processes -----------------------------------------------------------------

    def _spawn(self, name: str) -> _Actor:
        config = ActorConfig(name, self.model_dir, self.dtype, self.placement.devices,
                             self.placement.expert_owners, self.kv_tokens, self.threads,
                             self.address, self.host, self.heartbeat_s,
                             runtime_dir=self.runtime_dir, faults=self.faults,
                             null_ops=self.null_ops, scheduler=self.scheduler)
        keys = PlaneKeys(self.actor_keys[name], self.keys.public,
                         {n: k.public for n, k in self.actor_keys.items()})
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        bound_onednn_cache(env)
        if self.scheduler:  # its class is found in the actor where it is found here
            env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)
        # a process group of its own: a terminal's Ctrl-C (and hang-up) goes to the engine's
        # process alone, which decides what stops, from the actor's first instant (it also
        # ignores SIGINT, but only once its imports are done)
        proc = subprocess.Popen([sys.executable, "-m", "moeflow.actors.process", name],
                                stdin=subprocess.PIPE, env=env, process_group=0)
        assert proc.stdin is not None
        # a secret key travels only through this pipe, never a command line or environment
        with contextlib.suppress(BrokenPipeError):  # a child that died shows in liveness
            proc.stdin.write(launch_message(config, keys))
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        now = time.monotonic()
        return _Actor(config, proc, spawned=now, last_seen=now, last_busy=now)

    def _await_ready(self, names: Iterable[str]) -> None:
        """Wait until the named actors have said Hello; ActorStartError if one cannot start."""
        names = list(names)
        while True:
            for name in names:
                actor = self.actors[name]
                code = actor.proc.poll()
                if actor.data_address is None and code is not None and code > 0:
                    raise _start_failed(name, code)
            if all(self.actors[n].data_address is not None for n in names):
                return
            if self.router.poll(100):
                self._drain()
            self._check_liveness()

    def _drain(self) -> None:
        while self.router.poll(0):
            msgs, name = self._receive()
            for msg in msgs:
                self._dispatch(msg, name)

    def _started(self, actor: _Actor, hello: Hello) -> None:
        actor.data_address = hello.data_address
        actor.last_busy = time.monotonic()
        peers = Peers({n: a.data_address for n, a in self.actors.items()
                       if a.data_address is not None})
        for name in peers.addresses:
            self._send(name, peers)

    def _send(self, name: str, msg: object) -> None:
        self._flush()  # after the RunUnits submitted before it, in order
        with contextlib.suppress(zmq.ZMQError):  # an unreachable actor is caught by liveness
            send_frames(self.router, [name.encode(), *encode(msg)])

    def _receive(self) -> tuple[list[Any], str]:
        """The next messages (one, or a batch's) and the actor they came from; none if
        they were dropped."""
        parts = recv_frames(self.router)
        name = parts[0].bytes.decode(errors="replace")
        # the ZAP handler named the connection after the actor whose key it holds
        owner = user_id(parts[1]) if len(parts) > 1 else name
        if owner != name:
            self._drop("impostor", f"a message under the name {name!r} from {owner!r}'s key")
            return [], name
        try:
            return decode_all(parts[1:]), name  # type: ignore[return-value]
        except MessageError as exc:
            self._drop("malformed", f"a malformed message from {name!r}: {exc}")
            return [], name

    def _drop(self, reason: str, what: str) -> None:
        num = self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if num & (num - 1) == 0:  # the 1st, 2nd, 4th, ...: a flood does not flood the log
            log.warning("dropped %s (%s #%d)", what, reason, num)

    # -- the executor interface ----------------------------------------------------

    @property
    def kv_block_size(self) -> int:
        return DEFAULT_BLOCK_SIZE

    def kv_capacity_blocks(self) -> dict[str, int]:
        return {d: self.kv_tokens // DEFAULT_BLOCK_SIZE for d in self.placement.devices}

    @property
    def routing(self) -> dict[int, list[int]] | None:
        return self.coordinator.routing

    @property
    def tracker(self) -> JobTracker:
        return self.coordinator.tracker

    def submit(self, job: JobSpec) -> None:
        actors = sorted(set(job.plan.actors()) & set(self.actors))
        self._await_ready(actors)  # an actor restarting: its Hello comes first
        sends = self.coordinator.submit(job)
        self.started[job.job_id] = time.monotonic()
        encoded: dict[int, list[Any]] = {}  # one encoding of each distinct message
        for name, msg in sends:
            frames = encoded.get(id(msg))
            if frames is None:
                frames = encoded[id(msg)] = encode(msg)
            self.outbox.setdefault(name, []).append(frames)

    def _flush(self) -> None:
        """Send the RunUnits submitted since the last flush, a batch per actor."""
        outbox, self.outbox = self.outbox, {}
        for name, encoded in outbox.items():
            with contextlib.suppress(zmq.ZMQError):  # an unreachable actor: liveness sees it
                send_frames(self.router, [name.encode(), *pack(encoded)])

    def drop_plans(self, plan_ids: list[int]) -> None:
        """Cached plans that will not run again: each actor holding one forgets it."""
        for name, held in self.coordinator.drop_plans(plan_ids).items():
            self._send(name, DropPlans(held))

    def poll(self, timeout: float | None = None) -> list[JobResult]:
        """Results of finished jobs: wait up to `timeout` seconds (None: until one)."""
        self._flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.coordinator.done:
            wait_ms = 50
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait_ms = max(1, min(wait_ms, int(left * 1000)))
            if self.router.poll(wait_ms):
                self._drain()
            self._check_liveness()
            self._check_stalls()
            if deadline is None and not len(self.tracker) and not self.coordinator.done:
                break
        done = self.coordinator.take_done()
        if done and self.lost:  # on each: the engine takes them in any order
            lost = tuple(sorted(self.lost))
            for result in done:
                result.lost = lost
            self.lost.clear()
        return done

    def run_many(self, jobs: list[JobSpec]) -> list[JobResult]:
        return run_jobs(self, jobs)

    def release(self, home: str, seq_id: int) -> None:
        # every actor: a policy may keep a request's KV off its home (cgopipe's host)
        for actor in self.placement.devices:
            self._send(actor, Release((seq_id,)))

    def watch(self) -> list[str]:
        """Check the actors while no job is in flight, so that a dead one is restarted
        before the next request needs it; returns the devices whose state was lost."""
        while self.router.poll(0):  # heartbeats first, or a quiet actor looks dead
            msgs, name = self._receive()
            for msg in msgs:
                self._dispatch(msg, name)
        self._check_liveness()
        lost, self.lost = sorted(self.lost), set()
        return lost

    # -- inbound -------------------------------------------------------------------

    def _dispatch(self, msg: object, name: str) -> None:
        kind = type(msg).__name__
        actor = self.actors.get(name)
        if actor is None:
            self._drop("unknown_peer", f"a {kind} from unknown peer {name!r}")
            return
        claimed = getattr(msg, "actor", name)
        if claimed != name:
            self._drop("impostor", f"a {kind} from {name} claiming to come from {claimed!r}")
            return
        now = actor.last_seen = time.monotonic()
        if isinstance(msg, Hello):
            if actor.data_address is not None or msg.pid != actor.proc.pid:
                self._drop("unexpected", f"a Hello from {name} (pid {msg.pid})")
            else:
                self._started(actor, msg)
            return
        unit_id = getattr(msg, "unit_id", None)
        if unit_id is not None and not self.coordinator.expects(name, unit_id):
            self._drop("stale", f"a {kind} from {name} for unit {unit_id}, not in flight there")
            return
        if isinstance(msg, Heartbeat):
            if msg.num_done != actor.num_done or msg.running_s > 0:
                actor.last_busy = now
            actor.num_done, actor.running_s, actor.dropped = (msg.num_done, msg.running_s,
                                                              msg.dropped)
        elif isinstance(msg, (UnitPart, NodeFailed, RoutingCounts)):
            if isinstance(msg, UnitPart):
                actor.last_busy = now
            self._abort(self.coordinator.reply(msg))
        else:
            self._drop("unexpected", f"an unexpected {kind} from {name}")

    def _fail(self, unit_ids: list[int], error: str, retry: bool = False) -> None:
        self._abort(self.coordinator.fail(unit_ids, error, retry))

    def _abort(self, failed: list[int]) -> None:
        if failed:
            for name in self.actors:
                self._send(name, Abort(tuple(failed)))

    # -- faults --------------------------------------------------------------------

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for name, actor in list(self.actors.items()):
            code = actor.proc.poll()
            if code is not None and code > 0 and actor.data_address is None:
                # it failed to start (its error is on stderr): another try would fail the
                # same way. Killed by a signal, it is restarted
                raise _start_failed(name, code)
            if code is not None:
                self._restart(name, f"its process exited with code {code}")
            elif actor.data_address is None:  # starting: no heartbeats yet
                if now - actor.spawned > self.start_timeout:
                    raise ActorStartError(f"actor {name} did not start within "
                                          f"{self.start_timeout:.0f}s")
            elif now - actor.last_seen > self.heartbeat_timeout:
                self._restart(name, f"no heartbeat for {now - actor.last_seen:.1f}s")
            elif actor.running_s > self.node_timeout:
                self._restart(name, f"its core thread has been on one step for "
                                    f"{actor.running_s:.0f}s")

    def _check_stalls(self) -> None:
        """Fail each job that none of the actors still owing a share has worked on for
        `stall_timeout` (no node finished, none running). An actor not heard from lately
        is left to the heartbeat check, which names the actor."""
        now = time.monotonic()
        fresh = max(1.0, 5 * self.heartbeat_s)
        stalled: dict[int, float] = {}
        for job_id, since in list(self.started.items()):
            owing = self.tracker.waiting.get(job_id)
            if owing is None:
                del self.started[job_id]
                continue
            actors = [self.actors[n] for n in owing if n in self.actors]
            if any(now - a.last_seen > fresh for a in actors):
                continue
            idle = now - max([since, *(a.last_busy for a in actors)])
            if idle > self.stall_timeout:
                stalled[job_id] = idle
        for job_id, idle in stalled.items():
            self._fail([job_id], f"no progress for {idle:.1f} s on any of its actors: a "
                                 f"message was lost?", retry=True)
        for job_id in stalled:
            self.started.pop(job_id, None)

    @property
    def actor_dropped(self) -> dict[str, dict[str, int]]:
        """What each actor has dropped, by reason (as of its last heartbeat)."""
        return {name: dict(a.dropped) for name, a in self.actors.items()}

    def _restart(self, name: str, why: str) -> None:
        """Fail the jobs `name` was part of now, and start its successor; a job that needs
        it waits for its Hello in `submit`."""
        log.error("actor %s died (%s); restarting it", name, why)
        self.restarts += 1
        self.last_restart = f"actor {name} died ({why}) and was restarted"
        old = self.actors[name]
        with contextlib.suppress(OSError):
            old.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            old.proc.wait(timeout=5)
        self._fail(self.tracker.involving(name), f"actor {name} died ({why})", retry=True)
        self.lost.add(name)
        self.coordinator.restarted(name)
        self.actors[name] = self._spawn(name)

    def pids(self) -> dict[str, int]:
        return {name: a.proc.pid for name, a in self.actors.items()}

    def close(self) -> None:
        """Stop every actor process and wait for it: ask, then terminate, then kill."""
        if self.closed:
            return
        self.closed = True
        self.coordinator.close_trace()  # first: nothing below may keep it from completing
        for name, actor in self.actors.items():
            if actor.data_address is None:  # still starting (a restart): it has no socket
                actor.proc.terminate()  # for a Shutdown yet, so it would wait out the 5 s
            else:
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
        self.gatekeeper.stop()
        self.ctx.term()
        if self.runtime_dir:
            remove_runtime_dir(self.runtime_dir)

    def __enter__(self) -> ZmqExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
