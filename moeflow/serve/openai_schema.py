"""The OpenAI API's request side, as moeflow serves it (docs/http.md): which fields each
endpoint takes, how a request body becomes a `Call` (checked strictly: an unknown field,
a wrong type or an unsupported value is an ApiError naming it), and OpenAI's error body.
No I/O: moeflow/serve/http.py reads the bodies and answers."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moeflow.ops.sampling import MAX_LOGPROBS, SamplingParams
from moeflow.serve import protocol as p
from moeflow.serve.chat import GenerationDefaults

OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI


class ApiError(Exception):
    """A call answered with an OpenAI error body instead of being served."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
             403: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 408: "invalid_request_error",
             413: "invalid_request_error", 415: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status,
                                                                          "server_error"),
                          "param": self.param, "code": self.code}}

    @staticmethod
    def of(error: p.ProtocolError) -> ApiError:
        status = 429 if error.code == p.OVERLOADED else 400
        return ApiError(status, error.message, error.field, error.code)


COMMON_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
    "ignore_eos", "stream", "stream_options", "n", "logprobs", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "user", "logit_bias", "return_token_ids"})
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs",
                               "response_format", "tools", "tool_choice",
                               "add_generation_prompt"}
# OpenAI fields whose only value served is the neutral one (anything else: a 400 saying so)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "logit_bias": (None, {}), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"})}


@dataclass(eq=False)
class Call:
    """One HTTP generation: what was asked, and its state while it runs."""

    chat: bool
    model: str
    prompt_text: str | None
    prompt_ids: list[int] | None
    sampling: dict[str, Any]  # SamplingParams' fields; max_new_tokens 0 until fitted
    stream: bool
    include_usage: bool
    return_token_ids: bool = False  # vLLM's: the ids beside the text
    params: SamplingParams | None = None  # once fitted to the prompt
    id: str = ""
    created: int = 0
    task: asyncio.Task[Any] | None = None
    engine_id: int | None = None  # once admitted
    abort_reason: str | None = None  # "shutdown"

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())


class Fields(p._Checker):
    """Reads one JSON request's fields, raising a 400 that names the offending one."""

    def __init__(self, obj: dict[str, Any]) -> None:
        super().__init__(obj, "")

    def fail(self, name: str, expected: str) -> p.ProtocolError:
        return p.ProtocolError(p.INVALID_REQUEST, f"{name}: expected {expected}, got "
                                                  f"{json_brief(self.obj[name])}", None, name)

    def optional(self, name: str) -> bool:
        return self.obj.get(name) is not None  # JSON null means "not given", as OpenAI

    def boolean(self, name: str, default: bool) -> bool:
        return super().boolean(name, default) if self.optional(name) else default


def json_brief(value: Any) -> str:
    """`value` as JSON, cut to at most 60 characters: encoded only that far (a request's
    megabytes of nested arrays cost no more than a short one)."""
    text = ""
    try:
        for chunk in json.JSONEncoder().iterencode(value):
            text += chunk
            if len(text) > 60:
                break
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code or p.INVALID_REQUEST)


def check_model(obj: dict[str, Any], model_name: str) -> str:
    """The request's `model`, where it names one, is the one served here (404 if not);
    returns it (`model_name` where it names none)."""
    if "model" not in obj:
        return model_name
    model = Fields(obj).string("model")
    if model != model_name:
        raise ApiError(404, f"model: {model!r} is not served here (this server serves "
                            f"{model_name!r})", "model", "model_not_found")
    return model


def parse_call(obj: dict[str, Any], chat: bool, *, model_name: str, max_new_tokens: int,
               defaults: GenerationDefaults, render: Callable[[Any, bool], str]) -> Call:
    """A request body (a JSON object) -> the Call it asks for; ApiError otherwise.
    `render(messages, add_generation_prompt)` turns chat messages into the prompt."""
    check_names(obj, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    for name, allowed in NEUTRAL.items():
        value = obj.get(name)
        if value is not None and not any(
                value == v and isinstance(value, bool) == isinstance(v, bool)
                for v in allowed):
            raise bad(name, f"{name}: {json_brief(obj[name])} is not supported by this "
                            f"server (it serves {json_brief(allowed[-1])} only)",
                      "unsupported")
    check = Fields(obj)
    if "model" not in obj:
        raise bad("model", "model: missing (GET /v1/models lists this server's)")
    model = check_model(obj, model_name)
    text = ids = None
    if chat:
        if "messages" not in obj:
            raise bad("messages", "messages: missing")
        add = check.boolean("add_generation_prompt", True)
        text = render(obj["messages"], add)
    else:
        if "prompt" not in obj:
            raise bad("prompt", "prompt: missing")
        text, ids = parse_prompt(obj["prompt"])
    stream = check.boolean("stream", False)
    include_usage = False
    if check.optional("stream_options"):
        options = obj["stream_options"]
        if not stream:
            raise bad("stream_options", "stream_options: only with stream true")
        if (not isinstance(options, dict) or set(options) - {"include_usage"}
                or not isinstance(options.get("include_usage", False), (bool, type(None)))):
            raise bad("stream_options", f"stream_options: expected "
                                        f"{{\"include_usage\": bool}}, got "
                                        f"{json_brief(options)}")
        include_usage = options.get("include_usage") is True
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        if check.optional(name):
            max_tokens = check.integer(name, None, 1, max_new_tokens)
    stop: tuple[str, ...] = ()
    if check.optional("stop"):
        value = obj["stop"]
        stop = (value,) if isinstance(value, str) else check.str_list("stop")
        if any(not s for s in stop):
            raise bad("stop", "stop: stop strings must be non-empty")
        if len(stop) > p.MAX_STOP_STRINGS or any(len(s) > p.MAX_STOP_CHARS for s in stop):
            raise bad("stop", f"stop: at most {p.MAX_STOP_STRINGS} strings of at most "
                              f"{p.MAX_STOP_CHARS} characters")
    stop_ids = check.int_list("stop_token_ids", True, low=0) \
        if check.optional("stop_token_ids") else ()
    if len(stop_ids) > p.MAX_STOP_TOKEN_IDS:
        raise bad("stop_token_ids", f"stop_token_ids: at most {p.MAX_STOP_TOKEN_IDS} ids")
    d = defaults
    top_k = (check.integer("top_k", 0, -1, None) if check.optional("top_k")
             else d.get("top_k", 0))
    if check.optional("user"):
        check.string("user")
    sampling = dict(
        max_new_tokens=max_tokens or 0,  # 0: fitted to the prompt by fit_sampling
        temperature=(check.number("temperature", 1.0, low=0.0) if check.optional(
            "temperature") else d.get("temperature", 1.0)),
        top_p=(check.number("top_p", 1.0, low=0.0, low_open=True, high=1.0)
               if check.optional("top_p") else d.get("top_p", 1.0)),
        top_k=max(0, top_k),
        seed=check.integer("seed", None, 0, p.MAX_SEED) if check.optional("seed") else None,
        logprobs=_logprobs(check, chat),
        stop=stop, stop_token_ids=tuple(stop_ids),
        ignore_eos=check.boolean("ignore_eos", False) if check.optional("ignore_eos")
        else False)
    return Call(chat, model, text, ids, sampling, stream, include_usage,
                check.boolean("return_token_ids", False)
                if check.optional("return_token_ids") else False)


def fit_sampling(call: Call, num_prompt: int, max_position: int, max_new_tokens: int,
                 defaults: GenerationDefaults) -> SamplingParams:
    """The request's SamplingParams, with max_tokens defaulted: OpenAI's 16 for
    completions, the rest of the context for chat (both capped by the server's limit
    and generation_config.json's max_new_tokens)."""
    values = dict(call.sampling)
    room = max_position - num_prompt
    if values["max_new_tokens"] > room:
        raise bad("max_tokens", f"max_tokens: {values['max_new_tokens']} more tokens do not fit "
                                f"the model's {max_position}-token context after a "
                                f"{num_prompt}-token prompt", "context_length_exceeded")
    if not values["max_new_tokens"]:
        default = OPENAI_DEFAULT_MAX_TOKENS if not call.chat else room
        default = defaults.get("max_new_tokens", default)
        values["max_new_tokens"] = max(1, min(default, room,
                                              max_new_tokens))
    try:
        call.params = SamplingParams(**values)
    except ValueError as exc:
        raise bad(None, str(exc)) from None
    return call.params


def _logprobs(check: Fields, chat: bool) -> int | None:
    """How many top tokens' log-probabilities a call wants beside its own (None: no
    log-probabilities). Completions: `logprobs` N; chat: `logprobs` true, `top_logprobs` N."""
    if not chat:
        return (check.integer("logprobs", None, 0, MAX_LOGPROBS) if check.optional("logprobs")
                else None)
    wanted = check.boolean("logprobs", False) if check.optional("logprobs") else False
    top = (check.integer("top_logprobs", None, 0, MAX_LOGPROBS)
           if check.optional("top_logprobs") else None)
    if top and not wanted:
        raise bad("top_logprobs", "top_logprobs: needs logprobs true")
    return (top or 0) if wanted else None


def check_names(obj: dict[str, Any], allowed: frozenset[str] | set[str]) -> None:
    for key in obj:
        if key not in allowed:
            raise bad(key, f"{key}: unknown field (this endpoint takes "
                           f"{', '.join(sorted(allowed))})")


def parse_prompt(value: Any) -> tuple[str | None, list[int] | None]:
    """A completion's prompt: a string or a list of token ids, or a list of one of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    elif isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        raise bad("prompt", f"prompt: {len(value)} prompts; this server takes one per request")
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                       for t in value):
        return None, list(value)
    raise bad("prompt", f"prompt: expected a string or a list of token ids, got "
                        f"{json_brief(value)}")


def parse_messages(value: Any) -> list[dict[str, Any]]:
    """Chat messages, checked: role and content (a string, or a list of text parts)."""
    if not isinstance(value, list) or not value:
        raise bad("messages", f"messages: expected a non-empty list, got {json_brief(value)}")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad("messages", f"{where}: expected an object, got {json_brief(message)}")
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise bad("messages", f"{where}: unknown field {sorted(unknown)[0]!r} (a message "
                                  f"has role, content and name)")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad("messages", f"{where}.role: expected system, developer, user or "
                                  f"assistant, got {json_brief(role)}")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str) and set(part) == {"type", "text"}):
                    raise bad("messages", f"{where}.content: only text parts are served, got "
                                          f"{json_brief(part)}")
                parts.append(part["text"])
            content = "\n".join(parts)  # as vLLM joins a message's text parts
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad("messages", f"{where}.content: expected a string, got "
                                  f"{json_brief(content)}")
        entry = {"role": role, "content": content}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        out.append(entry)
    return out
