"""The actor plane is closed to other local processes, and faults in it show within seconds.

An intruder (another process on the machine, as any local user could run) connects to
every socket the coordinator and the actors bind: it reads nothing, forges nothing and
floods nothing, while a request running alongside gets exactly the tokens of an unfaulted
run. An insider holding a stolen actor key still cannot speak for another actor or make an
actor hold more than EARLY_BYTES. A stopped actor, a lost message, a wedged or dying core
thread are each found and fail only what they touch.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
import zmq

from moeflow.actors.coordinator import ZmqExecutor
from moeflow.actors.core import EARLY_BYTES, ActorCore
from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.actors.messages import (
    Data, Heartbeat, Hello, Payload, Release, UnitPart, decode, encode,
)
from moeflow.actors.plane import (
    Faults, Gatekeeper, KeyPair, PlaneKeys, connect_curve, ipc_address, make_runtime_dir,
    remove_runtime_dir, serve_curve,
)
from moeflow.actors.process import ActorConfig, launch_message
from moeflow.models.families import load_spec
from moeflow.scheduler import BatchEP, Cluster
from moeflow.serve.engine import EngineCore
from moeflow.ops.sampling import SamplingParams
from moeflow.testing.conformance import record_generation

PROMPTS = [[5, 17, 33, 2, 99, 250, 7], [8, 9, 10]]
STEPS = 6
MiB = 1 << 20


@pytest.fixture(scope="module")
def model(tiny_factory):
    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    ref = InProcessExecutor(load_workers(path, spec, cluster.placement, torch.float32, 4096))
    expected, _ = record_generation(ref, spec, BatchEP(), cluster, PROMPTS, STEPS)
    return path, spec, cluster, expected


@pytest.fixture(scope="module", params=["ipc", "tcp"])
def plane(request, model):
    path, _, cluster, _ = model
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096,
                     ipc=request.param == "ipc") as executor:
        yield executor


def generate(executor, model) -> dict[int, list[int]]:
    _, spec, cluster, _ = model
    return record_generation(executor, spec, BatchEP(), cluster, PROMPTS, STEPS)[0]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        kb = next(line for line in f if line.startswith("VmRSS:")).split()[1]
    return int(kb) * 1024


def endpoints(executor: ZmqExecutor) -> list[tuple[str, str]]:
    """Every socket the plane binds, with the public key of its server."""
    return [(executor.address, executor.keys.public),
            *((a.data_address, executor.actor_keys[n].public)
              for n, a in executor.actors.items())]


def test_the_plane_is_private_and_no_command_line_holds_a_key(plane):
    if plane.runtime_dir:
        assert stat.S_IMODE(os.stat(plane.runtime_dir).st_mode) == 0o700
        assert all(e.startswith(f"ipc://{plane.runtime_dir}/") for e, _ in endpoints(plane))
    else:
        assert all(e.startswith("tcp://127.0.0.1:") for e, _ in endpoints(plane))
    secrets = [plane.keys.secret, *(k.secret for k in plane.actor_keys.values())]
    for pid in plane.pids().values():
        for what in ("cmdline", "environ"):
            with open(f"/proc/{pid}/{what}", "rb") as f:
                text = f.read()
            assert not any(s.encode() in text for s in secrets), f"a secret key in {what}"
    assert all(s not in repr(plane.keys) and s not in repr(plane.actor_keys) for s in secrets)


INTRUDER = r"""
import json, socket, sys, time
import torch, zmq
from moeflow.actors.messages import Data, Done, Payload, UnitPart, encode

MiB = 1 << 20
args = json.loads(sys.argv[1])
names = args["names"]
ctx = zmq.Context()
readers = []
forged = [encode(UnitPart(u, n, {0: 42, 1: 42})) for u in range(64) for n in names]
tensor = torch.full((4, 8), 42.0)
fakes = [encode(Data(u, n, Payload("partial", {"start": 0}, (tensor,)))) for u in range(16)
         for n in range(16)] + [encode(Done(u, n)) for u in range(16) for n in range(64)]
big = encode(Data(10**6, 0, Payload("tensor", {}, (torch.zeros(MiB // 4),))))


def connect(kind, endpoint, server_key, curve, identity=None):
    s = ctx.socket(kind)
    s.linger = 0
    s.sndtimeo = 50
    if identity is not None:
        s.identity = identity.encode()
    if curve:  # a key of its own: the server's public key is no secret
        public, secret = zmq.curve_keypair()
        s.curve_publickey, s.curve_secretkey = public, secret
        s.curve_serverkey = server_key.encode()
    if kind == zmq.SUB:
        s.subscribe(b"")
    s.connect(endpoint)
    return s


def send_all(s, messages):
    for frames in messages:
        try:
            s.send_multipart(frames)
        except zmq.Again:
            return


def raw_flood(endpoint, nbytes):
    # a ZMTP 3.0 greeting (NULL mechanism), then one frame that claims nbytes, and its body
    if endpoint.startswith("ipc://"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(endpoint[len("ipc://"):])
    else:
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
    s.settimeout(2.0)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
    sent = 0
    try:
        s.sendall(greeting + b"\x02" + nbytes.to_bytes(8, "big"))
        chunk = b"\x2a" * MiB
        while sent < nbytes:
            sent += s.send(chunk)
    except OSError:
        pass
    s.close()
    return sent


raw_accepted = []
for endpoint, server_key in args["endpoints"]:
    for curve in (False, True):
        for identity in [None, *names]:  # eavesdroppers, some taking an actor's name
            readers.append(connect(zmq.DEALER, endpoint, server_key, curve, identity))
        readers.append(connect(zmq.PULL, endpoint, server_key, curve))
        readers.append(connect(zmq.SUB, endpoint, server_key, curve))
        for identity in [None, *names]:  # forged token 42 for the coordinator
            send_all(connect(zmq.DEALER, endpoint, server_key, curve, identity), forged)
        send_all(connect(zmq.PUSH, endpoint, server_key, curve), fakes)  # for the actors
        send_all(connect(zmq.PUSH, endpoint, server_key, curve), [big] * 256)
    raw_accepted.append(raw_flood(endpoint, args["flood_mb"] * MiB))
received = 0
deadline = time.monotonic() + 2.0
poller = zmq.Poller()
for s in readers:
    poller.register(s, zmq.POLLIN)
while time.monotonic() < deadline:
    for s, _ in poller.poll(100):
        s.recv_multipart()
        received += 1
print(json.dumps({"received": received, "raw_accepted": raw_accepted}))
"""


def test_an_intruder_reads_nothing_forges_nothing_and_floods_nothing(plane, model):
    expected = model[3]
    pids = plane.pids()
    rss = {name: rss_bytes(pid) for name, pid in pids.items()}
    stop = threading.Event()
    runs: list[dict[int, list[int]]] = []
    errors: list[BaseException] = []

    def serve() -> None:  # a request alongside the intrusion
        try:
            while not stop.is_set() or not runs:
                runs.append(generate(plane, model))
        except BaseException as exc:
            errors.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    try:
        args = {"endpoints": endpoints(plane), "names": sorted(pids), "flood_mb": 256}
        out = subprocess.run([sys.executable, "-c", INTRUDER, json.dumps(args)],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        stop.set()
        server.join(timeout=120)
    assert not server.is_alive() and not errors, errors
    print(f"\nintruder: {report}; refused keys: coordinator {plane.gatekeeper.num_refused}")
    assert report["received"] == 0
    assert runs and all(r == expected for r in runs)
    assert plane.pids() == pids
    assert plane.dropped == {}  # refused at the handshake: nothing even reached the app
    assert plane.gatekeeper.num_refused > 0
    plane.poll(timeout=2 * plane.heartbeat_s)  # the actors' latest counts
    assert all(d.get("refused_key", 0) > 0 for d in plane.actor_dropped.values())
    for name, pid in pids.items():
        assert rss_bytes(pid) - rss[name] < 64 * MiB, f"{name} grew under the flood"


def test_an_insider_cannot_speak_for_another_actor_or_fill_an_actors_memory(plane, model):
    """A process holding cpu:1's stolen key: the routing identity, the key's name and the
    claimed actor must agree, and early messages are capped by bytes."""
    expected = model[3]
    pids = plane.pids()
    ctx = zmq.Context()
    stolen = plane.actor_keys["cpu:1"]
    try:
        evil = ctx.socket(zmq.DEALER)
        evil.linger = 0
        evil.identity = b"evil"
        connect_curve(evil, stolen, plane.keys.public)
        evil.connect(plane.address)
        # the name is taken: without handover the ROUTER keeps the actor's own connection
        twin = ctx.socket(zmq.DEALER)
        twin.linger = 0
        twin.identity = b"cpu:0"
        connect_curve(twin, stolen, plane.keys.public)
        twin.connect(plane.address)
        forged = encode(UnitPart(0, "cpu:0", {0: 42}))
        evil.send_multipart(forged)
        twin.send_multipart(forged)
        deadline = time.monotonic() + 10
        while plane.dropped.get("impostor", 0) < 1:
            assert time.monotonic() < deadline, plane.dropped
            plane.poll(timeout=0.1)
        # what the real cpu:1 could still get wrong: another's name, a unit not in flight
        plane._dispatch(UnitPart(10**6, "cpu:0", {0: 42}), "cpu:1")
        plane._dispatch(UnitPart(10**6, "cpu:1", {0: 42}), "cpu:1")
        assert plane.dropped == {"impostor": 2, "stale": 1}

        flood = ctx.socket(zmq.PUSH)
        flood.linger = 0
        connect_curve(flood, stolen, plane.actor_keys["cpu:0"].public)
        flood.connect(plane.actors["cpu:0"].data_address)
        before = rss_bytes(pids["cpu:0"])
        for i in range(256):  # 256 MiB for units never admitted
            payload = Payload("tensor", {}, (torch.full((MiB // 4,), float(i)),))
            flood.send_multipart(encode(Data(10**6 + i, 0, payload)), copy=False)
        deadline = time.monotonic() + 60
        while plane.actor_dropped["cpu:0"].get("early_overflow", 0) < 256 - EARLY_BYTES // MiB:
            assert time.monotonic() < deadline, plane.actor_dropped
            plane.poll(timeout=0.1)
        grew = rss_bytes(pids["cpu:0"]) - before
        print(f"\ninsider flood: cpu:0 grew {grew / MiB:.0f} MiB, {plane.actor_dropped['cpu:0']}")
        assert grew < EARLY_BYTES + 64 * MiB
        assert generate(plane, model) == expected
        assert plane.pids() == pids
    finally:
        ctx.destroy(linger=0)


def test_early_messages_are_capped_in_bytes():
    core = ActorCore("cpu:0", worker=None)  # type: ignore[arg-type]
    tensor = torch.zeros(MiB // 4)
    for i in range(3 * EARLY_BYTES // MiB):
        core.handle(Data(100 + i, 0, Payload("tensor", {}, (tensor,))))
    held = sum(t.nbytes for msgs in core.early.values() for m in msgs
               for t in m.payload.tensors)
    assert EARLY_BYTES // 2 < held <= EARLY_BYTES
    assert core.dropped["early_overflow"] == 3 * EARLY_BYTES // MiB - len(core.early)


def test_faults_parse_and_validate():
    assert Faults.parse("drop=0.05,delay=0.02,seed=3") == Faults(0.05, 0.02, 3)
    assert Faults.parse("") == Faults() and not Faults().active
    for bad in ("drop=2", "delay=-1", "drop", "speed=3", "seed=x", "drop=0.1,drop=0.2"):
        with pytest.raises(ValueError):
            Faults.parse(bad)
    with pytest.raises(ValueError):
        ZmqExecutor("unused", Cluster.sharded(("cpu:0",), 4).placement, "float32", 16,
                    faults="drop=1.5")


@pytest.mark.timeout(240)
def test_delayed_data_still_gives_the_same_tokens_and_lost_data_fails_only_its_job(model):
    path, spec, cluster, expected = model
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096,
                     faults="delay=0.01,seed=2") as executor:
        assert generate(executor, model) == expected
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096,
                     faults="drop=1.0,seed=1") as executor:
        pids = executor.pids()
        engine = EngineCore(spec, executor, BatchEP(), cluster)
        request = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=3,
                                                               ignore_eos=True))
        started = time.monotonic()
        while engine.has_unfinished():
            engine.step()
        took = time.monotonic() - started
        assert request.finish_reason.startswith("error") and "no progress" in \
            request.finish_reason, request.finish_reason
        # a lost message is no fault of the request's: it runs again once, and stalls again
        assert request.retries == 1
        assert took < 2 * (executor.stall_timeout + 1.0), took
        assert executor.pids() == pids  # the job failed, not the actors
        assert sum(d.get("fault_drop", 0) for d in executor.actor_dropped.values()) > 0
        # a wedged core (its current step older than node_timeout) is restarted
        executor._dispatch(Heartbeat("cpu:1", time.time(), executor.actors["cpu:1"].num_done,
                                     executor.node_timeout + 1, {}), "cpu:1")
        executor._check_liveness()
        assert executor.pids()["cpu:1"] != pids["cpu:1"] and "cpu:1" in executor.lost


@pytest.mark.timeout(180)
def test_a_stopped_actor_is_found_within_5_s_and_its_request_runs_again(model):
    path, spec, cluster, expected = model
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096) as executor:
        pids = executor.pids()
        engine = EngineCore(spec, executor, BatchEP(), cluster)
        request = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=300,
                                                               ignore_eos=True))

        def run() -> None:
            while engine.has_unfinished():
                engine.step()

        stepping = threading.Thread(target=run)
        stepping.start()
        deadline = time.monotonic() + 60
        while len(request.output_ids) < 2:
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.01)
        os.kill(pids["cpu:1"], signal.SIGSTOP)
        stopped = time.monotonic()
        while request.retries == 0:  # its job failed, and it waits to run again
            assert request.finish_reason is None, request.finish_reason
            assert time.monotonic() - stopped < 30, "the request hung"
            time.sleep(0.01)
        took = time.monotonic() - stopped
        print(f"\nSIGSTOP found in {took:.2f} s")
        assert took < 5.0, took
        assert "cpu:1 died (no heartbeat" in executor.last_restart, executor.last_restart
        stepping.join(timeout=120)
        assert not stepping.is_alive()
        assert request.finish_reason == "length" and len(request.output_ids) == 300
        assert generate(executor, model) == expected
        assert executor.pids()["cpu:1"] != pids["cpu:1"]
    with pytest.raises(ProcessLookupError):
        os.kill(pids["cpu:1"], 0)


# -- an actor process behind a fake core: the shell alone --------------------------------

FAKE_ACTOR = """
import sys, time
import moeflow.actors.process as process

class Core:
    dropped = {}
    broken = False

    def start_tasks(self):
        if self.broken:
            raise RuntimeError("the core broke")
        return []

    def handle(self, msg):  # Release((1,)) breaks the core; any other wedges it for 60 s
        if msg.seq_ids == (1,):
            self.broken = True
        else:
            time.sleep(60)
        return []

process.build_core = lambda config: Core()
sys.exit(process.main(sys.argv))
"""


class FakeCoordinator:
    """A ROUTER with the plane's walls, and one actor process running FAKE_ACTOR."""

    def __init__(self) -> None:
        self.dir = make_runtime_dir()
        self.own, self.actor = KeyPair.make(), KeyPair.make()
        self.ctx = zmq.Context()
        self.gatekeeper = Gatekeeper(self.ctx, {self.actor.public: "cpu:0"})
        self.gatekeeper.start()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        serve_curve(self.router, self.own)
        address = ipc_address(self.dir, "coordinator")
        self.router.bind(address)
        config = ActorConfig("cpu:0", "unused", "float32", ("cpu:0",), (0,), 16, 1, address,
                             heartbeat_s=0.1, runtime_dir=self.dir)
        keys = PlaneKeys(self.actor, self.own.public, {"cpu:0": self.actor.public})
        self.proc = subprocess.Popen([sys.executable, "-c", FAKE_ACTOR, "cpu:0"],
                                     stdin=subprocess.PIPE)
        self.proc.stdin.write(launch_message(config, keys))
        self.proc.stdin.close()

    def receive(self, kind: type, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.router.poll(100):
                msg = decode(self.router.recv_multipart()[1:])
                if isinstance(msg, kind):
                    return msg
        raise AssertionError(f"no {kind.__name__} within {timeout} s")

    def send(self, msg) -> None:
        self.router.send_multipart([b"cpu:0", *encode(msg)])

    def exited_within(self, seconds: float) -> int | None:
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.router.close(linger=0)
        self.gatekeeper.stop()
        self.ctx.term()
        remove_runtime_dir(self.dir)


@pytest.mark.timeout(60)
def test_a_dying_core_thread_ends_the_process_promptly():
    fake = FakeCoordinator()
    try:
        fake.receive(Hello)
        deadline = time.monotonic() + 10
        while fake.receive(Heartbeat).running_s != 0.0:  # until the core waits for work
            assert time.monotonic() < deadline, "the idle core never reported running_s 0"
        fake.send(Release((1,)))
        assert fake.exited_within(3.0) == 1
    finally:
        fake.close()


@pytest.mark.timeout(60)
def test_a_wedged_core_shows_in_heartbeats_and_sigterm_still_ends_the_process():
    fake = FakeCoordinator()
    try:
        fake.receive(Hello)
        done = fake.receive(Heartbeat).num_done
        fake.send(Release((2,)))
        deadline = time.monotonic() + 10
        while True:  # the shell answers while the core is stuck in one step
            beat = fake.receive(Heartbeat)
            if beat.running_s > 1.0:
                break
            assert time.monotonic() < deadline, beat
        assert beat.num_done <= done + 1
        fake.proc.send_signal(signal.SIGTERM)
        assert fake.exited_within(4.0) is not None
    finally:
        fake.close()


PARENT = """
import sys, time
from moeflow.actors.coordinator import ZmqExecutor
from moeflow.models.families import load_spec
from moeflow.scheduler import Cluster

spec = load_spec(sys.argv[1])
cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
executor = ZmqExecutor(sys.argv[1], cluster.placement, "float32", 4096)
print(executor.runtime_dir, *executor.pids().values(), flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_a_killed_coordinators_actors_exit_and_remove_the_private_directory(model):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(model[0])],
                              stdout=subprocess.PIPE, text=True)
    runtime_dir, *pids = parent.stdout.readline().split()
    assert os.path.isdir(runtime_dir)
    parent.kill()
    parent.wait(timeout=30)
    deadline = time.monotonic() + 15
    while os.path.exists(runtime_dir) or any(os.path.exists(f"/proc/{p}") for p in pids):
        assert time.monotonic() < deadline, "the actors or the directory outlived the coordinator"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_an_actor_that_cannot_start_fails_the_executor_rather_than_restarting_forever(
        tmp_path, model):
    _, _, cluster, _ = model
    from moeflow.actors.coordinator import ActorInputError

    # what it was given is bad (no checkpoint there): a ValueError too, as the CLI's
    # other errors in what the user gave
    with pytest.raises(ActorInputError, match="could not load what it was given"):
        ZmqExecutor(str(tmp_path / "no-model"), cluster.placement, "float32", 4096)
