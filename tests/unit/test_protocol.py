"""The request protocol's schema: what parse_request takes, and the error code and field it
names for everything it refuses."""

from __future__ import annotations

import msgpack
import pytest

from moeflow.serve import protocol as p

LIMITS = p.Limits(max_new_tokens=100, max_prompt_tokens=8, vocab_size=512)
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
                           "ignore_eos": True, "stream": False}, LIMITS)
    assert isinstance(req, p.Generate)
    assert req.sampling() == {"max_new_tokens": 100, "temperature": 1.0, "top_p": 0.5,
                              "top_k": 4, "seed": 2 ** 64 - 1, "stop": ("\n",),
                              "stop_token_ids": (9,), "ignore_eos": True}
    assert (req.id, req.prompt, req.prompt_ids, req.stream) == ("req-1", "hello", None, False)
    assert isinstance(req.temperature, float)


def test_other_requests():
    assert p.parse_request({"type": "abort", "id": "x"}) == p.Abort("x")
    assert p.parse_request({"type": "health"}) == p.HealthQuery()
    assert p.parse_request({"type": "metrics"}) == p.MetricsQuery()
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
    for obj in ({"type": "health", "verbose": True}, {"type": "metrics", "id": 1},
                {"type": "abort", "id": 3, "reason": "bored"}):
        err = refused(obj)
        assert err.code == p.INVALID_REQUEST and err.field is not None
        assert err.message.startswith(err.field + ": unknown field")
    assert refused({"type": "health", 1: 2}).code == p.INVALID_REQUEST  # non-string key


@pytest.mark.parametrize("obj", [{}, {"type": "generat"}, {"type": None}, {"type": 1},
                                 {"type": "token", "id": 3}])
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
    assert p.MetricsReport({"running": 0}).wire() == {"type": "metrics", "running": 0}
    assert set(p.ERROR_CODES) == {"malformed", "unknown_type", "invalid_request",
                                  "prompt_too_long", "duplicate_id", "overloaded", "not_found",
                                  "internal"}
