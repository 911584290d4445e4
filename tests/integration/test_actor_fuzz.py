"""Malformed frames reaching an actor's sockets are logged and dropped: the actor process
survives and a following valid request still succeeds."""

from __future__ import annotations

import time

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeflow.actors.coordinator import ZmqExecutor
from moeflow.actors.messages import (
    BATCH, DATA_RUN, KINDS, RUN_BYTES, Data, Done, MessageError, Payload, Release, RunUnit,
    decode_all, encode, encode_many, pack,
)
from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.actors.values import Rows, from_payload, to_payload
from moeflow.actors.plane import connect_curve
from moeflow.models.families import load_spec
from moeflow.scheduler import BatchEP, Cluster
from moeflow.testing.conformance import record_generation

VALID = [
    encode(Data(7, 3, Payload("rows", {"home": "cpu:0", "start": 0},
                              (torch.ones(2, 4), torch.tensor([2], dtype=torch.int32),
                               torch.ones(2))), (2, 0))),
    encode(Data(7, 3, Payload("partial", {"start": 0}, (torch.ones(3, 4),)))),
    encode(Done(7, 1)),
    encode(Release((1001, 1002))),  # not the sequences the check after the fuzz runs
]
# a run: two units' rows for one peer, as one entry
RUN = encode_many([
    Data(7, 3, Payload("rows", {"home": "cpu:0", "start": 0},
                       (torch.ones(2, 4), torch.tensor([2], dtype=torch.int32), torch.ones(2))),
         (2, 0)),
    Data(8, 3, Payload("rows", {"home": "cpu:0", "start": 2},
                       (torch.ones(1, 4), torch.tensor([1], dtype=torch.int32), torch.ones(1))),
         (0, 1))])


def as_bytes(frames) -> list[bytes]:
    return [f if isinstance(f, bytes) else bytes(f) for f in frames]


@st.composite
def malformed(draw: st.DrawFn) -> list[bytes]:
    kind = draw(st.sampled_from(["random", "unknown kind", "truncated header",
                                 "wrong tensor size", "missing frames", "extra frames",
                                 "wrong field types", "header not a map", "wrong socket",
                                 "bad batch"]))
    base = as_bytes(draw(st.sampled_from([*VALID, RUN])))
    if kind == "random":
        return draw(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
    if kind == "unknown kind":
        return [bytes([draw(st.integers(13, 255))]), *base[1:]]
    if kind == "truncated header":
        cut = draw(st.integers(0, max(0, len(base[1]) - 1)))
        return [base[0], base[1][:cut], *base[2:]]
    if kind == "wrong tensor size" and len(base) > 2:
        i = draw(st.integers(2, len(base) - 1))
        return [*base[:i], base[i] + draw(st.binary(min_size=1, max_size=16)), *base[i + 1:]]
    if kind == "missing frames" and len(base) > 2:
        return base[:-1]
    if kind == "extra frames":
        return [*base, draw(st.binary(max_size=32))]
    if kind == "wrong field types":
        header = msgpack.unpackb(base[1], raw=False)
        key = draw(st.sampled_from(sorted(header)))
        value = draw(st.one_of(st.text(max_size=5), st.floats(allow_nan=True),
                               st.lists(st.integers(-2**31, 2**31), max_size=3), st.none(),
                               st.integers(-2**63, 2**64 - 1)))
        if key == "unit_id" and isinstance(value, int) and 0 <= value < 2**32:
            # a well-formed message for a unit the check below runs is not malformed: an
            # actor holds it until that unit comes, and fails the unit on its bad content,
            # as it should. Such ids are left alone.
            value += 2**32
        header[key] = value
        return [base[0], msgpack.packb(header), *base[2:]]
    if kind == "header not a map":
        return [base[0], msgpack.packb(draw(st.lists(st.integers(-2**31, 2**31), max_size=3)))]
    if kind == "bad batch":  # a batch whose index does not match its frames
        batch = as_bytes(pack([VALID[0], VALID[2]]))
        index = msgpack.unpackb(batch[1])
        index[draw(st.integers(0, 1))][1] += draw(st.sampled_from([-1, 1, 2**40]))
        return [batch[0], msgpack.packb(index), *batch[2:]]
    # a valid message of a kind that does not belong on the data socket
    return [bytes([KINDS[RunUnit]]), msgpack.packb({"unit_id": 1, "plan": {}})]


def test_a_batch_carries_its_messages_in_order_and_refuses_a_bad_index():
    batch = as_bytes(pack(VALID))
    assert batch[0] == bytes([BATCH]) and len(batch) == 2 + sum(len(v) - 1 for v in VALID)
    msgs = decode_all(batch)
    assert [type(m) for m in msgs] == [Data, Data, Done, Release]
    assert torch.equal(msgs[1].payload.tensors[0], torch.ones(3, 4))
    assert msgs[0].counts == (2, 0) and msgs[1].counts is None  # a dispatch's gate counts
    header = msgpack.unpackb(as_bytes(VALID[0])[1], raw=False)
    for bad in ([-1, 2], [1.5], "12", [2**64 - 1], {"a": 1}):
        frames = as_bytes(VALID[0])
        with pytest.raises(MessageError, match="bad Data counts"):
            decode_all([frames[0], msgpack.packb(dict(header, counts=bad)), *frames[2:]])
    assert msgs[2] == Done(7, 1) and msgs[3] == Release((1001, 1002))
    assert pack([VALID[2]]) is VALID[2]  # one message travels as itself
    for index in ([], [[KINDS[Done], 1]] * 5, [[BATCH, 1]], [[KINDS[Done], 0]], {"a": 1}):
        with pytest.raises(MessageError):
            decode_all([bytes([BATCH]), msgpack.packb(index), *batch[2:3]])


def rows(unit: int, n: int, width: int = 4, counts: tuple[int, ...] | None = (1, 1)) -> Data:
    x = torch.arange(unit * 100, unit * 100 + n * width, dtype=torch.float32).view(n, width)
    weights = torch.full((n,), unit / 10)
    return Data(unit, 3, Payload("rows", {"home": "cpu:0", "start": unit},
                                 (x, torch.tensor([n], dtype=torch.int32), weights)), counts)


def same(a: Data, b: Data) -> bool:
    return ((a.unit_id, a.node_id, a.counts, a.payload.kind, a.payload.meta)
            == (b.unit_id, b.node_id, b.counts, b.payload.kind, b.payload.meta)
            and len(a.payload.tensors) == len(b.payload.tensors)
            and all(x.dtype == y.dtype and torch.equal(x, y)
                    for x, y in zip(a.payload.tensors, b.payload.tensors)))


def test_consecutive_small_data_alike_travel_as_one_run_and_arrive_as_they_were_sent():
    big = rows(9, RUN_BYTES // 16 + 1)  # more bytes than a run takes: it goes alone
    partial = [Data(u, 4, Payload("partial", {"start": 0}, (torch.full((u, 4), float(u)),)))
               for u in (1, 2)]
    msgs = [rows(1, 2), rows(2, 0, counts=None), rows(3, 3), Done(3, 1), rows(4, 1),
            rows(5, 1, width=8), big, rows(6, 2), *partial, Release((1,))]
    frames = as_bytes(encode_many(msgs))
    index = msgpack.unpackb(frames[1])
    # rows 1-3 | Done | rows 4 | rows 5 (other width) | big | rows 6 | the partials | Release
    assert [k for k, _ in index] == [DATA_RUN, KINDS[Done], KINDS[Data], KINDS[Data],
                                     KINDS[Data], KINDS[Data], DATA_RUN, KINDS[Release]]
    assert index[0][1] == 1 + 3  # one header, a frame per tensor position
    got = decode_all(frames)
    assert len(got) == len(msgs)
    for a, b in zip(got, msgs):
        assert same(a, b) if isinstance(b, Data) else a == b
    assert from_payload(got[2].payload).ends.tolist() == [3]  # a run's rows are checked
    single = as_bytes(encode_many([rows(1, 2), rows(2, 1)]))  # a run alone, not in a batch
    assert single[0] == bytes([DATA_RUN]) and all(
        same(a, b) for a, b in zip(decode_all(single), [rows(1, 2), rows(2, 1)]))
    assert encode_many([rows(1, 2)])[0] == bytes([KINDS[Data]])  # one Data: as itself


def test_a_malformed_run_is_refused():
    frames = as_bytes(encode_many([rows(1, 2), rows(2, 1)]))
    header = msgpack.unpackb(frames[1], raw=False)
    member = header["members"][0]
    bad_headers = [
        dict(header, kind="page"), dict(header, members=[]), dict(header, members="x"),
        dict(header, members=[[*member[:4], [2, 1]], *header["members"][1:]]),  # 2 tensors
        dict(header, members=[[*member[:4], [3, 1, 1]], *header["members"][1:]]),  # rows
        dict(header, members=[[*member[:4], [-1, 1, 1]], *header["members"][1:]]),
        dict(header, members=[[*member[:3], [-1], member[4]], *header["members"][1:]]),
        dict(header, members=[[1.5, *member[1:]], *header["members"][1:]]),
        dict(header, tensors=header["tensors"][:2]), [1, 2],
    ]
    for bad in bad_headers:
        with pytest.raises(MessageError):
            decode_all([frames[0], msgpack.packb(bad), *frames[2:]])
    with pytest.raises(MessageError):  # a frame whose size its description does not match
        decode_all([*frames[:2], frames[2] + b"\0\0\0\0", *frames[3:]])
    with pytest.raises(MessageError):
        decode_all(frames[:1])


def test_a_payload_is_checked_when_it_comes_over_the_wire_and_not_in_its_own_process():
    rows = Rows("cpu:0", 0, torch.ones(2, 4), torch.tensor([2], dtype=torch.int32), torch.ones(2))
    sent = to_payload(rows)
    assert from_payload(sent) is rows  # the receiver in the sender's process takes it as is
    [arrived] = decode_all(as_bytes(encode(Data(7, 3, sent))))
    assert arrived.payload.value is None and arrived.payload.meta == sent.meta  # never sent
    got = from_payload(arrived.payload)
    assert got is not rows and torch.equal(got.x, rows.x) and torch.equal(got.ends, rows.ends)
    bad = Rows("cpu:0", 0, torch.ones(2, 4), torch.tensor([3], dtype=torch.int32), torch.ones(2))
    [arrived] = decode_all(as_bytes(encode(Data(7, 3, to_payload(bad)))))
    with pytest.raises(MessageError, match="inconsistent rows"):
        from_payload(arrived.payload)


@pytest.fixture(scope="module")
def cluster(tiny_factory):
    path = tiny_factory("olmoe")
    spec = load_spec(path)
    c = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    with ZmqExecutor(str(path), c.placement, "float32", 4096, want_logits=True) as executor:
        yield path, spec, c, executor


@pytest.mark.timeout(300)
def test_malformed_frames_are_dropped_and_the_actors_keep_serving(cluster):
    path, spec, c, executor = cluster
    pids = executor.pids()
    ctx = zmq.Context.instance()
    data_sockets = {}
    for name, actor in executor.actors.items():
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        # a peer's own keys: the fuzz is of what a cluster member may send, past CURVE
        other = next(n for n in executor.actors if n != name)
        connect_curve(sock, executor.actor_keys[other], executor.actor_keys[name].public)
        sock.connect(actor.data_address)
        data_sockets[name] = sock

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frames=malformed(), target=st.sampled_from(["cpu:0", "cpu:1"]),
           via=st.sampled_from(["data", "control"]))
    def send(frames, target, via):
        if via == "data":
            if frames:
                data_sockets[target].send_multipart(frames)
        else:
            executor.router.send_multipart([target.encode(), *frames] if frames
                                           else [target.encode(), b""])
        assert all(a.proc.poll() is None for a in executor.actors.values())

    send()
    time.sleep(0.5)
    for sock in data_sockets.values():
        sock.close(linger=0)
    assert executor.pids() == pids and all(a.proc.poll() is None
                                           for a in executor.actors.values())
    executor.poll(timeout=0.5)  # heartbeats and whatever the fuzzing provoked
    prompts = [[5, 6, 7, 8], [9, 10]]
    tokens, _ = record_generation(executor, spec, BatchEP(), c, prompts, 6)
    ref = InProcessExecutor(load_workers(path, spec, c.placement, torch.float32, 4096),
                            want_logits=True)
    expected, _ = record_generation(ref, spec, BatchEP(), c, prompts, 6)
    assert tokens == expected
    assert executor.pids() == pids
