"""The OpenAI request schema and the SSE hold-back, as pure functions."""

from __future__ import annotations

import pytest

from moeflow.serve.chat import GenerationDefaults
from moeflow.serve.openai_schema import (
    CHAT_FIELDS, COMPLETION_FIELDS, ApiError, fit_sampling, parse_call, parse_messages,
)
from moeflow.serve.protocol import ProtocolError
from moeflow.serve.sse import HoldBack


def parse(body: dict, chat: bool = False, defaults: dict | None = None):
    return parse_call({"model": "m", **body}, chat, model_name="m", max_new_tokens=4096,
                      defaults=GenerationDefaults(defaults or {}),
                      render=lambda messages, add: "|".join(m["content"] for m in messages))


def test_neutral_values_of_unsupported_fields_are_accepted():
    call = parse({"prompt": "x", "n": 1, "logprobs": None, "presence_penalty": 0.0,
                  "frequency_penalty": 0, "echo": False, "logit_bias": {}, "user": "u"})
    assert call.prompt_text == "x"
    with pytest.raises(ApiError) as info:
        parse({"prompt": "x", "presence_penalty": 0.5})
    assert (info.value.status, info.value.param, info.value.code) == (
        400, "presence_penalty", "unsupported")
    with pytest.raises(ProtocolError) as wrong:
        parse({"prompt": "x", "logprobs": True})  # completions take a count, not a bool
    assert wrong.value.field == "logprobs"


@pytest.mark.parametrize("chat", [False, True])
def test_a_field_given_null_takes_its_default(chat):
    base = {"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"}
    plain = parse(base, chat)
    for name in sorted((CHAT_FIELDS if chat else COMPLETION_FIELDS) - set(base) - {"model"}):
        call = parse({**base, name: None}, chat)
        assert (call.sampling, call.stream, call.include_usage, call.prompt_text) == (
            plain.sampling, plain.stream, plain.include_usage, plain.prompt_text), name


def test_logprobs_as_completions_and_chat_ask_for_them():
    assert parse({"prompt": "x"}).sampling["logprobs"] is None
    assert parse({"prompt": "x", "logprobs": 3}).sampling["logprobs"] == 3
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse({**chat, "logprobs": True}, chat=True).sampling["logprobs"] == 0
    assert parse({**chat, "logprobs": True, "top_logprobs": 5},
                 chat=True).sampling["logprobs"] == 5
    assert parse({**chat, "logprobs": False}, chat=True).sampling["logprobs"] is None
    with pytest.raises(ApiError) as info:
        parse({**chat, "top_logprobs": 2}, chat=True)
    assert info.value.param == "top_logprobs"
    with pytest.raises(ProtocolError):
        parse({"prompt": "x", "logprobs": 21})


def test_sampling_defaults_come_from_generation_config_unless_the_request_says():
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 100}
    call = parse({"prompt": "x"}, defaults=defaults)
    params = fit_sampling(call, 5, 2048, 4096, GenerationDefaults(defaults))
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (
        0.6, 0.95, 20, 100)
    call = parse({"prompt": "x", "temperature": 0, "top_k": -1, "max_tokens": 7},
                 defaults=defaults)
    params = fit_sampling(call, 5, 2048, 4096, GenerationDefaults(defaults))
    assert (params.temperature, params.top_k, params.max_new_tokens) == (0.0, 0, 7)


def test_max_tokens_defaults_to_16_for_completions_and_the_context_for_chat():
    none = GenerationDefaults({})
    assert fit_sampling(parse({"prompt": "x"}), 5, 2048, 4096, none).max_new_tokens == 16
    chat = parse({"messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert chat.prompt_text == "hi"
    assert fit_sampling(chat, 48, 2048, 4096, none).max_new_tokens == 2000
    assert fit_sampling(chat, 48, 2048, 100, none).max_new_tokens == 100


def test_max_tokens_past_the_context_is_refused_as_openai_does():
    none = GenerationDefaults({})
    with pytest.raises(ApiError) as info:
        fit_sampling(parse({"prompt": "x", "max_tokens": 2000}), 100, 2048, 4096, none)
    assert (info.value.param, info.value.code) == ("max_tokens", "context_length_exceeded")
    assert fit_sampling(parse({"prompt": "x", "max_tokens": 1948}), 100, 2048, 4096,
                        none).max_new_tokens == 1948


def test_a_stop_string_across_tokens_is_never_released():
    held = HoldBack(("END",))
    # the last len("END") - 1 characters wait, as they could begin it
    out = [held.add(piece) for piece in ("abc", "E", "N", "D tail")]
    assert out == ["a", "b", "c", ""]
    assert held.rest("abc") == ""  # the engine's final text, cut at the stop
    held = HoldBack(("END",))
    out = [held.add(piece) for piece in ("abE", "Nx", "yz")]
    assert out == ["a", "bE", "Nx"]  # "ENx" is not "END": released a token later
    assert held.rest("abENxyz") == "yz"


def test_without_stops_text_is_sent_as_it_comes():
    held = HoldBack(())
    assert [held.add(p) for p in ("a", "", "bc")] == ["a", "", "bc"]
    assert held.rest("abc") == ""


def test_a_messages_text_parts_are_joined_by_newlines_as_vllm_joins_them():
    [message] = parse_messages([{"role": "user", "content": [
        {"type": "text", "text": "Line one"}, {"type": "text", "text": "Line two"}]}])
    assert message["content"] == "Line one\nLine two"


def test_completions_top_logprobs_hold_the_sampled_token():
    """OpenAI's "up to logprobs+1": a sampled token outside the top N is among them too."""
    from moeflow.serve.sse import LogprobsFormat

    form = LogprobsFormat(False, lambda i: "abcdef"[i].encode())
    entry = form.of(5, (-6.9, ((0, -0.1), (1, -2.5))))
    assert entry["top_logprobs"] == [{"a": -0.1, "b": -2.5, "f": -6.9}]
    assert form.of(0, (-0.1, ((0, -0.1), (1, -2.5))))["top_logprobs"] == [
        {"a": -0.1, "b": -2.5}]


def test_json_brief_encodes_only_what_it_shows():
    from moeflow.serve.openai_schema import json_brief

    huge = [[i] for i in range(1 << 20)]
    assert json_brief(huge).startswith("[[0], [1], [2]") and len(json_brief(huge)) == 60
    assert json_brief({"a": None}) == '{"a": null}'
    assert json_brief(object()) == "object"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 408, 413, 415])
def test_a_clients_error_is_typed_invalid_request_error(status):
    """4xx refusals are the client's doing: OpenAI's `invalid_request_error`, never
    `server_error` (which tells a client to blame, and retry, the server)."""
    assert ApiError(status, "m").body()["error"]["type"] == "invalid_request_error"
    assert ApiError(429, "m").body()["error"]["type"] == "rate_limit_error"
    assert ApiError(503, "m").body()["error"]["type"] == "server_error"


def test_logprobs_name_a_token_that_holds_part_of_a_character_by_its_bytes():
    """A token of part of a character is "bytes:" and its bytes, as OpenAI names it, with
    those bytes in chat's `bytes` (joined, the text); tokens of different bytes stay apart
    in completions' top_logprobs, and text offsets count characters of the text."""
    from moeflow.serve.sse import LogprobsFormat

    pieces = [b"a", b"\xe4", b"\xb8", b"\xad", b"b", b"\xe5"]  # "a", "中" in 3, "b"
    chat = LogprobsFormat(True, pieces.__getitem__)
    entries = [chat.of(i, (-1.0, ((i, -1.0), (5, -2.0))))["content"][0] for i in range(5)]
    assert [e["token"] for e in entries] == ["a", "bytes:\\xe4", "bytes:\\xb8",
                                             "bytes:\\xad", "b"]
    assert bytes(b for e in entries for b in e["bytes"]).decode() == "a中b"
    assert entries[1]["top_logprobs"][1] == {"token": "bytes:\\xe5", "logprob": -2.0,
                                             "bytes": [0xe5]}
    plain = LogprobsFormat(False, pieces.__getitem__)
    parts = [plain.of(i, (-1.0, ((i, -1.0), (5, -2.0)))) for i in range(5)]
    assert [p["text_offset"][0] for p in parts] == [0, 1, 1, 1, 2]
    assert parts[1]["top_logprobs"][0] == {"bytes:\\xe4": -1.0, "bytes:\\xe5": -2.0}
