"""The request protocol's schema: what parse_request takes, and the error code and field it
names for everything it refuses."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeflow.serve import protocol as p
from moeflow.serve.metrics import Metrics, Rate

LIMITS = p.Limits(max_new_tokens=100, max_prompt_tokens=8, vocab_size=512, max_prompt_bytes=64)
pytestmark = pytest.mark.timeout(30)


def gen(**fields: object) -> dict[str, object]:
    return {"type": "generate", "id": 7, "prompt_ids": [1, 2, 3], **fields}


def refused(obj: object, limits: p.Limits = LIMITS) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_request(obj, limits)
    return info.value


def test_a_minimal_generate_takes_the_defaults():
    req = p.parse_request(gen(), LIMITS)
    assert req == p.Generate(7, prompt_ids=(1, 2, 3))
    assert (req.max_new_tokens, req.temperature, req.top_p, req.top_k, req.seed, req.stream,
            req.ignore_eos) == (16, 0.0, 1.0, 0, None, True, False)
    assert eval(repr(req), {"Generate": p.Generate}) == req  # plain data: repr is Python


def test_a_full_generate_keeps_every_field():
    req = p.parse_request({"type": "generate", "id": "req-1", "prompt": "hello",
                           "max_new_tokens": 100, "temperature": 1, "top_p": 0.5, "top_k": 4,
                           "seed": 2 ** 64 - 1, "stop": ["\n"], "stop_token_ids": [9],
                           "ignore_eos": True, "stream": False, "deadline": 1.5e9}, LIMITS)
    assert isinstance(req, p.Generate)
    assert req.sampling() == {"max_new_tokens": 100, "temperature": 1.0, "top_p": 0.5,
                              "top_k": 4, "seed": 2 ** 64 - 1, "stop": ("\n",),
                              "stop_token_ids": (9,), "ignore_eos": True}
    assert (req.id, req.prompt, req.prompt_ids, req.stream) == ("req-1", "hello", None, False)
    assert isinstance(req.temperature, float) and req.deadline == 1.5e9


def test_other_requests():
    assert p.parse_request({"type": "abort", "id": "x"}) == p.Abort("x")
    assert p.parse_request({"type": "health"}) == p.HealthQuery()
    assert p.parse_request({"type": "metrics"}) == p.MetricsQuery()
    # an optional id, echoed in the reply; nil is no id
    assert p.parse_request({"type": "health", "id": "h"}) == p.HealthQuery("h")
    assert p.parse_request({"type": "metrics", "id": 3}) == p.MetricsQuery(3)
    assert p.parse_request({"type": "health", "id": None}) == p.HealthQuery()
    for bad in (True, "", 1.5, b"h", [1]):
        for kind in ("health", "metrics"):
            err = refused({"type": kind, "id": bad})
            assert (err.code, err.field, err.request_id) == (p.INVALID_REQUEST, "id", None)
    assert p.parse_request({"type": "generate", "id": 0, "seed": None,
                            "prompt": "x"}).seed is None  # type: ignore[union-attr]


@pytest.mark.parametrize("fields, name", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 101}, "max_new_tokens"),          # over the server's limit
    ({"max_new_tokens": True}, "max_new_tokens"),         # a bool is not an int
    ({"max_new_tokens": 4.0}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": False}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": "\n"}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"stream": "yes"}, "stream"),
    ({"prompt_ids": []}, "prompt_ids"),
    ({"prompt_ids": [1, "2"]}, "prompt_ids"),
    ({"prompt_ids": [1, True]}, "prompt_ids"),
    ({"prompt_ids": [512]}, "prompt_ids"),                # outside the vocabulary
    ({"prompt_ids": "1,2"}, "prompt_ids"),
    ({"prompt": "hi"}, "prompt"),                         # both prompt and prompt_ids
    ({"deadline": -1}, "deadline"),
    ({"deadline": "soon"}, "deadline"),
    ({"deadline": float("inf")}, "deadline"),
    ({"deadline": True}, "deadline"),
    ({"colour": "red"}, "colour"),                        # unknown field
])
def test_bad_generate_fields_are_invalid_requests_naming_the_field(fields, name):
    err = refused(gen(**fields))
    assert (err.code, err.field, err.request_id) == (p.INVALID_REQUEST, name, 7)
    assert err.message.startswith(name + ":"), err.message


def test_neither_prompt():
    err = refused({"type": "generate", "id": 1})
    assert (err.code, err.field) == (p.INVALID_REQUEST, "prompt")
    assert "exactly one" in err.message


@pytest.mark.parametrize("obj", [
    {"type": "generate", "prompt": "x"},
    {"type": "abort"},
])
def test_a_missing_id(obj):
    err = refused(obj)
    assert (err.code, err.field, err.request_id) == (p.INVALID_REQUEST, "id", None)
    assert "id: missing" in err.message


@pytest.mark.parametrize("bad_id", [True, 1.0, None, "", "x" * 257, [1], {"a": 1}])
def test_a_bad_id(bad_id):
    for kind in ("generate", "abort"):
        err = refused({"type": kind, "id": bad_id, "prompt": "x"} if kind == "generate"
                      else {"type": kind, "id": bad_id})
        assert (err.code, err.field, err.request_id) == (p.INVALID_REQUEST, "id", None)


def test_unknown_fields_on_every_type():
    for obj in ({"type": "health", "verbose": True}, {"type": "metrics", "since": 1},
                {"type": "abort", "id": 3, "reason": "bored"}):
        err = refused(obj)
        assert err.code == p.INVALID_REQUEST and err.field is not None
        assert err.message.startswith(err.field + ": unknown field")
    assert refused({"type": "health", 1: 2}).code == p.INVALID_REQUEST  # non-string key


@pytest.mark.parametrize("obj", [{}, {"type": "generat"}, {"type": None}, {"type": 1},
                                 {"type": "token", "id": 3}, {"type": {"a": 1}, "id": 3},
                                 {"type": ["generate"]}, {"type": {}}, {"type": b"health"},
                                 {"type": float("nan")}, {"type": msgpack.ExtType(1, b"x")}])
def test_unknown_types(obj):
    err = refused(obj)
    assert err.code == p.UNKNOWN_TYPE and "type" in err.message
    assert err.request_id == obj.get("id")


def test_prompt_too_long():
    err = refused(gen(prompt_ids=list(range(9))))
    assert (err.code, err.request_id) == (p.PROMPT_TOO_LONG, 7)
    assert "9 tokens" in err.message and "8" in err.message
    assert p.parse_request(gen(prompt_ids=list(range(8))), LIMITS)  # exactly the limit
    p.check_prompt_length(8, LIMITS, 1)
    with pytest.raises(p.ProtocolError):
        p.check_prompt_length(9, LIMITS, 1)
    # a long list is refused by its length, before its ids are read
    assert refused(gen(prompt_ids=["x"] * 9)).code == p.PROMPT_TOO_LONG


def test_a_text_prompt_is_bounded_by_bytes_before_tokenizing():
    assert p.parse_request({"type": "generate", "id": 7, "prompt": "x" * 64}, LIMITS)
    assert p.parse_request({"type": "generate", "id": 7, "prompt": "é" * 32}, LIMITS)
    for prompt, num_bytes in (("x" * 65, 65), ("é" * 33, 66), ("\U0001f600" * 17, 68)):
        err = refused({"type": "generate", "id": 7, "prompt": prompt})
        assert (err.code, err.field, err.request_id) == (p.PROMPT_TOO_LONG, "prompt", 7)
        assert err.message == f"prompt: {num_bytes} bytes of text; this server takes at most 64"
    assert p.parse_request({"type": "generate", "id": 7, "prompt": "x" * 10 ** 6})  # no limit
    with pytest.raises(ValueError, match="byte limit"):
        p.Limits(max_prompt_bytes=0)


def test_decoding_and_framing():
    assert p.decode(p.encode({"type": "health"})) == {"type": "health"}
    for body in (b"\xc1", b"", msgpack.packb([1, 2]), msgpack.packb("health"),
                 msgpack.packb({"type": "health"}) + b"\x00"):
        with pytest.raises(p.ProtocolError) as info:
            p.decode(body)
        assert info.value.code == p.MALFORMED
    assert p.split_frames([b"m"]) == ([], b"m")
    assert p.split_frames([b"", b"m"]) == ([b""], b"m")
    for frames in ([], [b"x", b"m"], [b"", b"", b"m"]):
        with pytest.raises(p.ProtocolError) as info:
            p.split_frames(frames)
        assert info.value.code == p.MALFORMED
    assert refused([1, 2]).code == p.MALFORMED


def nested(depth: int, leaf: Any = None) -> Any:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


def depth_of(obj: Any) -> int:
    if isinstance(obj, dict):
        return 1 + max(map(depth_of, obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max(map(depth_of, obj), default=0)
    return 0


def test_deep_nesting_is_malformed_before_decoding():
    body = p.encode({"type": "generate", "id": 1, "prompt": nested(p.MAX_DEPTH - 1)})
    assert refused(p.decode(body)).code == p.INVALID_REQUEST  # exactly the limit: decoded
    for depth in (p.MAX_DEPTH, 600, 10 ** 5):  # past Python's recursion limit and msgpack's
        body = (b"\x83\xa4type\xa8generate\xa2id\x01\xa6prompt" + b"\x91" * depth +
                b"\xc0")
        with pytest.raises(p.ProtocolError) as info:
            p.decode(body)
        assert info.value.code == p.MALFORMED and "deep" in info.value.message
    # empty containers and one-byte runs count too
    with pytest.raises(p.ProtocolError):
        p.check_depth(b"\x91" * 40 + b"\x90")
    p.check_depth(b"\xdc\x00\x03\x90\x80\x01", max_depth=2)
    with pytest.raises(p.ProtocolError):
        p.check_depth(b"\xdc\x00\x03\x90\x80\x01", max_depth=1)
    for truncated in (b"", b"\x91", b"\xdd\xff\xff", b"\xda\xff\xff\x00", b"\xc1"):
        p.check_depth(truncated)  # not msgpack: left to decode


ints = st.integers(-(1 << 63), (1 << 64) - 1)  # what msgpack carries
msgpack_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats()
    | st.text(max_size=40) | st.binary(max_size=300)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | ints, inner, max_size=4),
    max_leaves=30)


@given(msgpack_values, st.integers(1, 6))
def test_the_depth_scan_agrees_with_decoding(value, max_depth):
    body = p.encode(value)
    try:
        p.check_depth(body, max_depth)
    except p.ProtocolError:
        assert depth_of(value) > max_depth
    else:
        assert depth_of(value) <= max_depth


FIELD_NAMES = sorted({"type", "id", "prompt", "prompt_ids", "max_new_tokens", "temperature",
                      "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                      "stream", "deadline", "colour"})
TYPES = st.sampled_from(["generate", "abort", "health", "metrics"]) | msgpack_values


@given(st.dictionaries(st.sampled_from(FIELD_NAMES) | msgpack_values.filter(
    lambda v: not isinstance(v, (list, dict))), msgpack_values, max_size=6), TYPES)
def test_parse_request_refuses_anything_with_a_protocol_error(obj, kind):
    obj = {**obj, "type": kind} if kind is not None else obj
    try:
        p.parse_request(obj, LIMITS)
    except p.ProtocolError as exc:
        assert exc.code in (p.MALFORMED, p.UNKNOWN_TYPE, p.INVALID_REQUEST, p.PROMPT_TOO_LONG)
        assert len(exc.message) < 400  # values are shown cut short


@given(st.binary(max_size=200))
def test_decode_refuses_any_bytes_with_a_protocol_error(body):
    try:
        p.parse_request(p.decode(body), LIMITS)
    except p.ProtocolError as exc:
        assert exc.code in (p.MALFORMED, p.UNKNOWN_TYPE, p.INVALID_REQUEST, p.PROMPT_TOO_LONG)


def test_error_messages_show_values_cut_short():
    huge = {"type": "generate", "id": 1, "prompt": b"\x00" * (1 << 20)}
    assert len(refused(huge).message) < 200
    assert len(refused({"type": "x" * (1 << 20)}).message) < 200
    assert len(refused({"type": "health", "k" * (1 << 20): 1}).message) < 400
    err = refused(gen(stop=list(range(10 ** 5))))
    assert err.message.startswith("stop: expected a list of strings, got an array [0, 1, 2, 3")


def test_replies_on_the_wire():
    final = p.Final("a", "length", (1, 2), "xy", 3, 2, 0.1, 0.05, 0.2).wire()
    assert final == {"type": "final", "id": "a", "finish_reason": "length", "token_ids": [1, 2],
                     "text": "xy", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                     "timings": {"ttft_s": 0.1, "tpot_s": 0.05, "e2e_s": 0.2}}
    assert p.Token(1, 0, 5, "a").wire() == {"type": "token", "id": 1, "index": 0,
                                            "token_id": 5, "text": "a"}
    assert p.Aborted(1).wire() == {"type": "aborted", "id": 1}
    err = p.ErrorReply.of(p.ProtocolError(p.OVERLOADED, "full", 4))
    assert err.wire() == {"type": "error", "id": 4, "code": "overloaded", "message": "full"}
    assert p.MetricsReport({"running": 0}).wire() == {"type": "metrics", "id": None,
                                                      "running": 0}
    assert p.MetricsReport({}, "m").wire() == {"type": "metrics", "id": "m"}
    health = p.HealthReport("ok", "tiny", "qwen3_moe", 512, 2048, "batch-ep", ("cpu:0",),
                            "inproc", 0, 0, id="h").wire()
    assert (health["protocol_version"], health["features"], health["id"]) == (
        2, ("deadline", "query_id"), "h")
    assert p.decode(p.encode(health))["features"] == ["deadline", "query_id"]
    assert set(p.ERROR_CODES) == {"malformed", "unknown_type", "invalid_request",
                                  "prompt_too_long", "duplicate_id", "overloaded", "not_found",
                                  "deadline_exceeded", "internal"}


def test_stops_are_bounded():
    base = {"type": "generate", "id": 1, "prompt_ids": [1]}
    assert len(p.parse_request({**base, "stop": ["x"] * 16}).stop) == 16
    for fields, name in (({"stop": ["x"] * 17}, "stop"), ({"stop": ["x" * 257]}, "stop"),
                         ({"stop_token_ids": [1] * 1025}, "stop_token_ids")):
        with pytest.raises(p.ProtocolError) as err:
            p.parse_request({**base, **fields})
        assert (err.value.code, err.value.field) == (p.INVALID_REQUEST, name)


def test_a_deadline_is_checked_against_the_time_given():
    req = p.parse_request(gen(deadline=1000), LIMITS)
    assert isinstance(req, p.Generate) and req.deadline == 1000.0
    assert "deadline" not in req.sampling()
    assert p.parse_request(gen(deadline=None), LIMITS).deadline is None  # type: ignore[union-attr]
    p.check_deadline(req, 999.5)
    p.check_deadline(p.Generate(1, prompt="x"), 1e12)  # no deadline: never late
    for now in (1000.0, 1011.25):
        with pytest.raises(p.ProtocolError) as info:
            p.check_deadline(req, now)
        err = info.value
        assert (err.code, err.request_id, err.field) == (p.DEADLINE_EXCEEDED, 7, "deadline")
        assert err.message.startswith("deadline: 1000.000 passed")
    assert "11.250 s ago" in err.message


def test_an_error_detached_from_its_id_names_it():
    err = p.detached(p.ProtocolError(p.INVALID_REQUEST, "top_k: expected ...", "a", "top_k"))
    assert (err.code, err.request_id, err.field) == (p.INVALID_REQUEST, None, "top_k")
    assert err.message == "id 'a': top_k: expected ..."
    assert p.ErrorReply.of(err).wire()["id"] is None
    plain = p.ProtocolError(p.MALFORMED, "not msgpack")
    assert p.detached(plain) is plain


def test_bin_values_and_keys_that_are_not_strings():
    """What docs/protocol.md says a msgpack bin or a non-string map key gets."""
    def code_of(message: object) -> tuple[str, object, str]:
        with pytest.raises(p.ProtocolError) as info:
            p.parse_request(p.decode(msgpack.packb(message, use_bin_type=True)), LIMITS)
        return info.value.code, info.value.request_id, info.value.message

    # bin where a string belongs: refused like any other wrong type, naming the field
    assert code_of(gen(prompt_ids=None, prompt=b"hi"))[0] == p.INVALID_REQUEST
    code, rid, message = code_of({"type": "generate", "id": 7, "prompt": b"hi"})
    assert (code, rid) == (p.INVALID_REQUEST, 7) and message.startswith(
        "prompt: expected a string, got binary b'hi'")
    assert code_of(gen(stop=[b"x"]))[:2] == (p.INVALID_REQUEST, 7)
    code, rid, message = code_of({"type": "generate", "id": b"x", "prompt": "hi"})
    assert (code, rid) == (p.INVALID_REQUEST, None) and message.startswith("id:")
    assert code_of({"type": b"health"})[0] == p.UNKNOWN_TYPE
    # keys that are not strings: an integer, nil, bin, a float or a bool key is an
    # invalid_request (after "type" is checked); a bin "type" key is no type at all
    for key in (1, None, b"type", 1.5, True):
        code, rid, message = code_of({"type": "generate", "id": 7, "prompt": "x", key: 1})
        assert (code, rid) == (p.INVALID_REQUEST, 7), key
        assert message.startswith("field names must be strings, got ")
    assert code_of({b"type": "health"})[0] == p.UNKNOWN_TYPE
    # an array or a map as a key cannot be decoded (Python cannot hash it): malformed
    for body in (b"\x81\x91\x01\x01", b"\x81\x81\x01\x01\x01"):
        with pytest.raises(p.ProtocolError) as info:
            p.decode(body)
        assert info.value.code == p.MALFORMED and "map key" in info.value.message
    # a str that is not UTF-8 cannot be decoded either
    with pytest.raises(p.ProtocolError) as info:
        p.decode(b"\x81\xa4type\xa2\xff\xfe")
    assert info.value.code == p.MALFORMED


# -- the metrics reply ---------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rejected_requests_are_counted_by_code():
    metrics = Metrics(FakeClock())
    for code in ("overloaded", "deadline_exceeded", "overloaded"):
        metrics.rejected(code)
    assert metrics.snapshot()["rejected"] == {"overloaded": 2, "deadline_exceeded": 1}
    text = metrics.prometheus()
    assert "# TYPE moeflow:request_rejected_total counter" in text
    assert 'moeflow:request_rejected_total{code="overloaded"} 2' in text
    assert 'moeflow:request_rejected_total{code="deadline_exceeded"} 1' in text


def test_the_token_rate_covers_the_last_ten_seconds():
    clock = FakeClock(1000.0)
    metrics = Metrics(clock)
    clock.now = 1000.5
    for _ in range(10):
        metrics.token()
    clock.now = 1001.0  # 10 tokens in the first second of uptime
    assert metrics.snapshot()["generated_tokens_per_s"] == pytest.approx(10.0)
    clock.now = 1005.0
    assert metrics.snapshot()["generated_tokens_per_s"] == pytest.approx(10 / 5)
    for _ in range(30):
        metrics.token()  # at 1005.0
    clock.now = 1010.5  # the window: 1001.0 .. 1010.5 holds the 30 only
    snapshot = metrics.snapshot()
    assert snapshot["generated_tokens_per_s"] == pytest.approx(30 / 9.5)
    assert snapshot["generated_tokens"] == 40  # the lifetime count stays
    clock.now = 1030.0  # nothing for 10 s: 0, whatever came before
    assert metrics.snapshot()["generated_tokens_per_s"] == 0.0
    assert metrics.snapshot()["uptime_s"] == 30.0


def test_a_rate_reuses_its_buckets():
    rate = Rate(3)
    rate.add(10.2, 5)
    rate.add(13.7, 1)  # the same bucket as second 10: reset, not added to
    assert rate.per_s(14.0, since=0.0) == pytest.approx(1 / 2.0)  # 12.0 .. 14.0
    assert rate.per_s(13.9, since=13.0) == pytest.approx(1 / 0.9)


class _Final:
    finish_reason, completion_tokens, ttft_s, tpot_s, e2e_s = "stop", 3, 0.02, 0.004, 0.03


def test_prometheus_uses_vllm_names_with_the_moeflow_prefix():
    metrics = Metrics(FakeClock())
    metrics.request_started(5)
    metrics.token()
    metrics.request_finished(_Final())
    metrics.gauge(waiting=2, running=1)
    metrics.recomputed(preemptions=3, retries=1)
    metrics.recomputed(preemptions=0, retries=1)
    assert (metrics.snapshot()["preemptions"], metrics.snapshot()["retries"]) == (3, 2)
    text = metrics.prometheus(extra={"moeflow:kv_blocks_free": 7})
    for line in ('moeflow:request_success_total{finished_reason="stop"} 1',
                 "moeflow:num_preemptions_total 3", "moeflow:request_retries_total 2",
                 "# TYPE moeflow:request_retries_total counter",
                 "moeflow:prompt_tokens_total 5", "moeflow:generation_tokens_total 1",
                 "moeflow:num_requests_waiting 2", "moeflow:num_requests_running 1",
                 'moeflow:time_to_first_token_seconds_bucket{le="0.025"} 1',
                 "moeflow:request_time_per_output_token_seconds_count 1",
                 'moeflow:e2e_request_latency_seconds_bucket{le="+Inf"} 1',
                 "# TYPE moeflow:kv_blocks_free gauge", "moeflow:kv_blocks_free 7"):
        assert line in text.splitlines(), line
    assert "moeflow_" not in text  # the names before vLLM's are gone


def test_an_unknown_field_with_a_newline_is_quoted_in_the_message():
    forged = "x\n2026-12-06 20:30:00,000 INFO moeflow.server: forged"
    with pytest.raises(p.ProtocolError) as info:
        p.parse_request({"type": "health", forged: 1}, p.Limits())
    assert "\n" not in info.value.message and "unknown field" in info.value.message


def test_health_queries_at_once_share_one_engine_call():
    """However many health queries wait, the engine thread is asked once (it answers
    between steps): a flood of them queues no flood of engine calls."""
    import asyncio
    from types import SimpleNamespace

    from moeflow.serve.config import EngineConfig
    from moeflow.serve.server import RequestServer, ServerConfig

    class Engine:
        calls = 0
        spec = SimpleNamespace(name="m", family="qwen3_moe", vocab_size=8,
                               max_position_embeddings=16)
        metrics = SimpleNamespace(snapshot=lambda: {"waiting": 0, "running": 0})

        async def call(self, fn):
            Engine.calls += 1
            await asyncio.sleep(0.05)  # a step in progress
            return fn(SimpleNamespace(book=SimpleNamespace(waiting=[1], running=[2, 3])))

        def health(self):
            return {"status": "ok", "restarts": 0, "last_error": None}

    async def run():
        server = RequestServer(ServerConfig(EngineConfig("/unused")), engine=Engine())
        reports = await asyncio.gather(*(server.health_report(i) for i in range(500)))
        again = await server.health_report("later")  # a query after them asks anew
        return reports, again

    reports, again = asyncio.run(run())
    assert Engine.calls == 2
    assert all((r.status, r.waiting, r.running) == ("ok", 1, 2) for r in reports)
    assert [r.id for r in reports] == list(range(500)) and again.id == "later"


def test_a_message_of_many_containers_is_malformed_before_decoding():
    ok = msgpack.packb({"type": "generate", "id": 1, "prompt_ids": [1] * 5000,
                        "stop": ["a", "b"], "stop_token_ids": [3]})
    assert p.decode(ok)["prompt_ids"] == [1] * 5000
    for junk in ({"type": "health", "pad": [[]] * 300}, {"type": "health", "pad": [{}] * 300},
                 {"type": "health", "pad": [[1], [[2]]] * 100}):
        with pytest.raises(p.ProtocolError, match="256 maps and arrays") as info:
            p.decode(msgpack.packb(junk))
        assert info.value.code == p.MALFORMED


def test_a_client_inbox_drops_the_replies_of_a_generate_left_early_until_its_final():
    from moeflow.serve.client import _Inbox

    inbox, key = _Inbox(), ("generate", "x")
    inbox.open(key)
    inbox.put({"type": "token", "id": "x", "index": 0})
    inbox.close(key, drain=True)  # left after its first token: an abort is on its way
    assert key in inbox.draining
    inbox.open(key)  # a new generate reusing the id (the clients wait for the drain first)
    inbox.put({"type": "token", "id": "x", "index": 1})  # the old request's
    inbox.put({"type": "final", "id": "x", "finish_reason": "abort"})  # the old request's
    assert inbox.take(key) is None and key not in inbox.draining
    inbox.put({"type": "token", "id": "x", "index": 0})
    assert inbox.take(key) == {"type": "token", "id": "x", "index": 0}
    inbox.close(key)
    # its final already received: nothing to drain
    inbox.open(key)
    inbox.put({"type": "final", "id": "x", "finish_reason": "length"})
    inbox.close(key, drain=True)
    assert key not in inbox.draining
