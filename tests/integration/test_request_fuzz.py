"""No request takes `moeflow serve` down.

Hypothesis drives one real server (batch-ep, in-process engine) over its request socket:

- malformed requests (random bytes, msgpack that is not a map, a map or an array as
  "type", wrong field types, unknown fields, deep nesting, extreme integers, NaN and
  infinite floats, over-long text, bad framing), mixed with valid requests: each malformed
  one gets one error reply with the code the schema gives it (never `internal`), each valid
  one completes;
- the whole space of valid generate requests (any temperature >= 0 down to 5e-324, top_p
  down to 1e-300, seeds up to 2^64 - 1, stops, ...): each ends in a final (or fails alone
  with an error reply) within a timeout, while a greedy request beside it gets its usual
  tokens, and health stays ok.

The local parse_request is the oracle for what is malformed; the server must agree with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from serve_harness import RawClient, Server

from moeflow.serve import protocol as p

VOCAB = 512
MAX_PROMPT_TOKENS = 2047  # the tiny checkpoint's max_position_embeddings - 1
MAX_PROMPT_BYTES = 2048
LIMITS = p.Limits(p.DEFAULT_MAX_NEW_TOKENS_LIMIT, MAX_PROMPT_TOKENS, VOCAB, MAX_PROMPT_BYTES)
TIMEOUT_S = 30.0  # per request: a hang fails the test instead of stalling it
GREEDY = {"type": "generate", "id": -1, "prompt_ids": [5, 17, 33], "max_new_tokens": 4,
          "ignore_eos": True, "stream": False}
# an example is a few round trips to a tiny model (about 10 ms): 100 take a second or two,
# and the nightly profile's 1000 about 10 s per test
FUZZ = settings(max_examples=max(100, settings().max_examples), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
# the corners of the space, always tried: values that once overflowed the sampler
EXTREMES = [
    {"temperature": 1e-45, "seed": 1},
    {"temperature": 5e-324, "seed": (1 << 64) - 1},
    {"temperature": 0.8, "top_p": 1e-300},
    {"temperature": 1.0, "top_p": 5e-324, "top_k": 3},
    {"temperature": 1e308, "top_k": (1 << 64) - 1, "seed": 0},
    {"temperature": (1 << 64) - 1, "top_p": 1},
    {"temperature": 1e-300, "stop": ["a", "\n", "\U0001f600"], "stop_token_ids": [0, 1, 2]},
    {"temperature": 0, "ignore_eos": True, "stop_token_ids": [(1 << 64) - 1], "stream": False},
]


@pytest.fixture(scope="module")
def model(tiny_factory) -> Path:
    return tiny_factory("qwen3_moe")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory) -> Iterator[Server]:
    srv = Server(model, tmp_path_factory.mktemp("fuzz") / "server.log",
                 "--max-prompt-bytes", str(MAX_PROMPT_BYTES))
    try:
        yield srv
    finally:
        code, log = srv.stop(), srv.log.read_text()
        assert code == 0, log
        # the catch-alls that answer `internal` never ran
        assert "failed to handle a message" not in log and "admission failed" not in log, log


@dataclass(frozen=True, slots=True)
class Probe:
    """Frames to send and what must come back: an error code, or the reply type of a valid
    request ("final", "health", "metrics")."""

    frames: tuple[bytes, ...]
    expect: str


def oracle(frames: tuple[bytes, ...]) -> str | None:
    """The error code the schema gives these frames, or None if it takes them."""
    try:
        _, body = p.split_frames(list(frames))
        p.parse_request(p.decode(body), LIMITS)
    except p.ProtocolError as exc:
        return exc.code
    return None


def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


# -- strategies ----------------------------------------------------------------------

ints = st.integers(-(1 << 63), (1 << 64) - 1)  # all msgpack carries
scalars = (st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12)
           | st.binary(max_size=12) | st.builds(msgpack.ExtType, st.integers(0, 127),
                                                 st.binary(max_size=8)))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
FIELDS = ("id", "prompt", "prompt_ids", "max_new_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stop_token_ids", "ignore_eos", "stream")
BAD = {  # values the schema refuses, besides whatever `values` draws
    "id": st.sampled_from([True, 1.5, None, "", "x" * 257, [1], {"a": 1}, b"id"]),
    "prompt": st.sampled_from([b"hi", ["hi"]])
    | st.builds(str.__mul__, st.characters(codec="utf-8"),  # over the byte limit
                st.integers(MAX_PROMPT_BYTES + 1, MAX_PROMPT_BYTES + 8)),
    "prompt_ids": st.sampled_from([[], "1,2", [1, "2"], [1, True], [-1], [1.0], [[1]],
                                   [0] * (MAX_PROMPT_TOKENS + 1)])
    | st.lists(st.integers(VOCAB, (1 << 64) - 1), min_size=1, max_size=3),
    "max_new_tokens": st.sampled_from([0, -1, p.DEFAULT_MAX_NEW_TOKENS_LIMIT + 1,
                                       (1 << 64) - 1, -(1 << 63), True, 4.0, "5"]),
    "temperature": st.floats().filter(lambda x: not 0 <= x < float("inf"))
    | st.sampled_from([-5e-324, -(1 << 63), "hot", True, [0.5]]),
    "top_p": st.floats().filter(lambda x: not 0 < x <= 1)
    | st.sampled_from([0, -0.0, 2, (1 << 64) - 1, True, "1"]),
    "top_k": st.sampled_from([-1, -(1 << 63), True, 1.5, "3", None]),
    "seed": st.sampled_from([-1, -(1 << 63), 1.5, True, "7", [1]]),
    "stop": st.sampled_from(["\n", [""], [1], [b"x"], [None], {"a": "b"}]),
    "stop_token_ids": st.sampled_from([[-1], [True], [1.0], ["1"], 5, [-(1 << 63)]]),
}


def valid_base(request_id: int) -> dict[str, Any]:
    return {"type": "generate", "id": request_id, "prompt_ids": [1, 2, 3], "max_new_tokens": 1}


@st.composite
def bad_field(draw: st.DrawFn, request_id: int) -> Probe:
    field = draw(st.sampled_from(FIELDS))
    message = valid_base(request_id)
    if field == "prompt":
        del message["prompt_ids"]
    message[field] = draw(BAD.get(field, st.nothing()) | values)
    frames = (pack(message),)
    code = oracle(frames)
    assume(code is not None)
    return Probe(frames, code)


@st.composite
def unknown_field(draw: st.DrawFn, request_id: int) -> Probe:
    key = draw(st.text(max_size=12).filter(lambda k: k not in ("type", *FIELDS)) | ints
               | st.binary(max_size=4))
    message = draw(st.sampled_from([valid_base(request_id), {"type": "health"},
                                    {"type": "metrics"}, {"type": "abort", "id": request_id}]))
    frames = (pack({**message, key: draw(values)}),)
    return Probe(frames, p.INVALID_REQUEST)


@st.composite
def bad_type(draw: st.DrawFn, request_id: int) -> Probe:
    kind = draw(values.filter(lambda v: v not in ("generate", "abort", "health", "metrics")))
    message = {"type": kind, "id": request_id, "prompt_ids": [1]}
    if draw(st.booleans()):
        del message["type"]
    return Probe((pack(message),), p.UNKNOWN_TYPE)


@st.composite
def deep(draw: st.DrawFn) -> Probe:
    depth = draw(st.integers(p.MAX_DEPTH + 1, 3000))  # containers, past the limit alone
    opener = draw(st.sampled_from([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01",
                                   b"\xdf\x00\x00\x00\x01\x00"]))
    nest = opener * depth + draw(st.sampled_from([b"\xc0", b"\x90", b"\x80", b"\x01"]))
    where = draw(st.sampled_from(["top", "type", "prompt", "id"]))
    if where == "top":
        body = nest
    else:
        fields = {"type": pack("generate"), "id": pack(1), "prompt": pack("hi"), where: nest}
        body = bytes([0x80 | len(fields)]) + b"".join(pack(k) + v for k, v in fields.items())
    assert oracle((body,)) == p.MALFORMED
    return Probe((body,), p.MALFORMED)


@st.composite
def not_a_map(draw: st.DrawFn) -> Probe:
    value = draw(values.filter(lambda v: not isinstance(v, dict)))
    return Probe((pack(value),), p.MALFORMED)


@st.composite
def random_bytes(draw: st.DrawFn) -> Probe:
    frames = (draw(st.binary(max_size=48)),)
    code = oracle(frames)
    assume(code is not None)
    return Probe(frames, code)


@st.composite
def bad_framing(draw: st.DrawFn) -> Probe:
    body = pack({"type": "health"})
    frames = draw(st.sampled_from([(b"x", body), (b"", b"", body), (body, body),
                                   (b"", body, b"")]))
    return Probe(frames, p.MALFORMED)


@st.composite
def valid(draw: st.DrawFn, request_id: int) -> Probe:
    kind = draw(st.sampled_from(["generate", "health", "metrics", "abort"]))
    if kind == "abort":  # of an id not in progress
        return Probe((pack({"type": "abort", "id": request_id}),), p.NOT_FOUND)
    if kind != "generate":
        return Probe((pack({"type": kind}),), kind)
    message = {"type": "generate", "id": request_id, "stream": draw(st.booleans()),
               "max_new_tokens": draw(st.integers(1, 3))}
    if draw(st.booleans()):
        message["prompt_ids"] = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                              max_size=8))
    else:
        message["prompt"] = draw(st.text(min_size=1, max_size=40))
    return Probe((pack(message),), "final")


@st.composite
def probes(draw: st.DrawFn) -> list[Probe]:
    out = []
    for request_id in range(draw(st.integers(1, 6))):
        out.append(draw(st.one_of(
            random_bytes(), not_a_map(), bad_type(request_id), bad_field(request_id),
            unknown_field(request_id), deep(), bad_framing(), valid(request_id))))
    return out


@st.composite
def valid_generates(draw: st.DrawFn) -> dict[str, Any]:
    """A generate the schema takes, from anywhere in its space (small max_new_tokens)."""
    message: dict[str, Any] = {"type": "generate",
                               "id": draw(st.integers(0, (1 << 64) - 1)
                                          | st.text(min_size=1, max_size=p.MAX_ID_CHARS))}
    if draw(st.booleans()):
        message["prompt_ids"] = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                              max_size=24))
    else:
        message["prompt"] = draw(st.text(min_size=1, max_size=120))  # <= 480 bytes
    optional = {
        "max_new_tokens": st.integers(1, 4),
        "temperature": st.sampled_from([0, 0.0, 1e-45, 5e-324, 1e-300, 1e-8, 1.0, 1e30, 1e308,
                                        (1 << 64) - 1])
        | st.floats(0, allow_infinity=False) | st.integers(0, (1 << 64) - 1),
        "top_p": st.sampled_from([1, 1.0, 1e-300, 5e-324, 0.5])
        | st.floats(0, 1, exclude_min=True),
        "top_k": st.integers(0, VOCAB + 8) | st.just((1 << 64) - 1),
        "seed": st.none() | st.integers(0, (1 << 64) - 1),
        "stop": st.lists(st.text(min_size=1, max_size=6), max_size=3),
        "stop_token_ids": st.lists(st.integers(0, (1 << 64) - 1), max_size=4),
        "ignore_eos": st.booleans(),
        "stream": st.booleans(),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            message[name] = draw(strategy)
    message.setdefault("max_new_tokens", 4)
    assert oracle((pack(message),)) is None, message  # the strategy stays in the schema
    return message


def example_each(messages: list[dict[str, Any]]) -> Any:
    """@example(message) for each message."""
    def decorate(test: Any) -> Any:
        for message in reversed(messages):
            test = example(message)(test)
        return test
    return decorate


# -- driving -------------------------------------------------------------------------


def replies_to(client: RawClient, request_id: Any) -> list[dict[str, Any]]:
    """A generate's replies through its final or error."""
    out = [client.next_for(request_id, ("token", "final", "error"), timeout=TIMEOUT_S)]
    while out[-1]["type"] == "token":
        out.append(client.next_for(request_id, ("token", "final", "error"), timeout=TIMEOUT_S))
    return out


def check(client: RawClient, probe: Probe) -> None:
    client.socket.send_multipart(list(probe.frames))
    reply = client.recv(TIMEOUT_S)
    if probe.expect == "final":
        request_id = reply["id"]
        replies = [reply] if reply["type"] != "token" else \
            [reply, *replies_to(client, request_id)]
        assert replies[-1]["type"] == "final", (probe, replies[-1])
        assert replies[-1]["finish_reason"] in ("length", "stop"), (probe, replies[-1])
    elif probe.expect in ("health", "metrics"):
        assert reply["type"] == probe.expect, (probe, reply)
    else:
        assert reply["type"] == "error" and reply["code"] == probe.expect, (probe, reply)
        assert reply["message"], reply


def assert_healthy(client: RawClient, expected_tokens: list[int]) -> None:
    health = client.ask({"type": "health"}, timeout=TIMEOUT_S)
    assert health["status"] == "ok", health
    client.send(GREEDY)
    final = client.next_for(GREEDY["id"], ("final", "error"), timeout=TIMEOUT_S)
    assert final["type"] == "final" and final["token_ids"] == expected_tokens, final


@pytest.fixture(scope="module")
def greedy_tokens(server) -> list[int]:
    client = RawClient(server.address)
    try:
        client.send(GREEDY)
        final = client.next_for(GREEDY["id"], ("final",), timeout=TIMEOUT_S)
        assert len(final["token_ids"]) == GREEDY["max_new_tokens"]
        return list(final["token_ids"])
    finally:
        client.close()


def healthy_after(server, greedy_tokens) -> None:
    client = RawClient(server.address)
    try:
        assert_healthy(client, greedy_tokens)
    finally:
        client.close()


@pytest.mark.timeout(300)
def test_malformed_requests_get_their_error_and_valid_ones_complete(server, greedy_tokens):
    @FUZZ
    @given(probes())
    def run(sequence: list[Probe]) -> None:
        client = RawClient(server.address)
        try:
            for probe in sequence:
                check(client, probe)
        finally:
            client.close()

    run()
    healthy_after(server, greedy_tokens)


@pytest.mark.timeout(300)
def test_every_valid_request_completes_alone_and_the_server_stays_healthy(server,
                                                                          greedy_tokens):
    @FUZZ
    @given(valid_generates())
    @example_each([{"type": "generate", "id": i, "prompt_ids": [5, 17, 33], "max_new_tokens": 4,
                    **fields} for i, fields in enumerate(EXTREMES)]
                  + [{"type": "generate", "id": "text", "prompt": "Once upon a time",
                      "max_new_tokens": 4, "temperature": 1e-45, "top_p": 1e-300}])
    def run(message: dict[str, Any]) -> None:
        client = RawClient(server.address)
        try:
            client.send(message)
            client.send(GREEDY)  # beside it: a failure must stay with its request
            replies = replies_to(client, message["id"])
            last = replies[-1]
            if last["type"] == "error":  # failed alone, saying why; not refused by the schema
                assert last["code"] not in (p.MALFORMED, p.UNKNOWN_TYPE, p.INVALID_REQUEST,
                                            p.DUPLICATE_ID), last
                assert last["message"], last
            else:
                assert last["type"] == "final", last
                assert len(last["token_ids"]) <= message["max_new_tokens"]
                if message.get("stream", True):
                    tokens = replies[:-1]
                    assert [r["index"] for r in tokens] == list(range(len(tokens)))
                    assert [r["token_id"] for r in tokens] == last["token_ids"]
            beside = client.next_for(GREEDY["id"], ("final", "error"), timeout=TIMEOUT_S)
            assert beside["type"] == "final" and beside["token_ids"] == greedy_tokens, beside
            health = client.ask({"type": "health"}, timeout=TIMEOUT_S)
            assert health["status"] == "ok", health
        finally:
            client.close()

    run()
    healthy_after(server, greedy_tokens)
