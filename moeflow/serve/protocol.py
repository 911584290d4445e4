"""The request protocol of `moeflow serve`, as a schema (docs/protocol.md is its prose).

A client's DEALER talks to the server's ROUTER. Each message is one ZeroMQ frame holding a
msgpack map whose "type" names its kind (a client may put one empty delimiter frame first,
REQ-style; the server echoes it on every reply to that request).

    client -> server   generate, abort, health, metrics
    server -> client   token, final, aborted, health, metrics, error

`decode` checks the nesting depth of a frame's msgpack before decoding it; `parse_request`
checks a decoded request strictly (unknown fields, wrong types, values out of range) and
returns a frozen dataclass. Both raise only ProtocolError, carrying the error code and a
message that names the offending field, whatever the input. Nothing here does I/O, and
nothing reads the clock: `check_deadline` takes the time.

Versions: the health reply carries PROTOCOL_VERSION and FEATURES. Replies may gain fields
(clients ignore the ones they do not know); a client sends a newer request field only when
the server lists its feature; PROTOCOL_VERSION changes only for an incompatible change.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Union, cast

import msgpack

from moeflow.serve.msgpack_depth import nests_deeper, too_many_containers

PROTOCOL_VERSION = 2  # 1: before versioning (docs/protocol.md says what changed)
# what this server takes beyond version 2's base: generate's "deadline"; an "id" on health
# and metrics, echoed in their replies
FEATURES = ("deadline", "query_id")

# request types
GENERATE = "generate"
ABORT = "abort"
HEALTH = "health"
METRICS = "metrics"
# reply types (besides "health" and "metrics")
TOKEN = "token"
FINAL = "final"
ABORTED = "aborted"
ERROR = "error"

# error codes
MALFORMED = "malformed"              # not msgpack, not a map, nested too deep, bad framing
UNKNOWN_TYPE = "unknown_type"        # "type" missing or not a request type
INVALID_REQUEST = "invalid_request"  # unknown field, wrong type, missing field, out of range
PROMPT_TOO_LONG = "prompt_too_long"  # more prompt tokens (or text bytes) than the server takes
DUPLICATE_ID = "duplicate_id"        # the id is already in progress for this client
OVERLOADED = "overloaded"            # the admission queue is full: retry later
NOT_FOUND = "not_found"              # abort of an id that is not in progress
DEADLINE_EXCEEDED = "deadline_exceeded"  # a generate's deadline passed before admission
INTERNAL = "internal"                # the server failed; the request did not complete
ERROR_CODES = (MALFORMED, UNKNOWN_TYPE, INVALID_REQUEST, PROMPT_TOO_LONG, DUPLICATE_ID,
               OVERLOADED, NOT_FOUND, DEADLINE_EXCEEDED, INTERNAL)

DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_MAX_NEW_TOKENS_LIMIT = 4096
MAX_ID_CHARS = 256
MAX_SEED = (1 << 64) - 1
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_DEPTH = 32  # containers nested in containers; a valid request nests 2 deep
MAX_CONTAINERS = 256  # maps and arrays in one message; a valid request holds at most 4

RequestId = Union[str, int]


class ProtocolError(ValueError):
    """A request the server answers with an error reply instead of serving."""

    def __init__(self, code: str, message: str, request_id: RequestId | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.request_id, self.field = code, message, request_id, field


@dataclass(frozen=True, slots=True)
class Limits:
    """What this server takes: the largest max_new_tokens, the longest prompt in tokens and
    a text prompt's longest UTF-8 encoding in bytes (None: no limit known here), and the
    vocabulary size (None: ids are not range-checked here)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    max_prompt_tokens: int | None = None
    vocab_size: int | None = None
    max_prompt_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"the max_new_tokens limit must be >= 1, got {self.max_new_tokens}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"the prompt limit must be >= 1, got {self.max_prompt_tokens}")
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError(f"the prompt byte limit must be >= 1, got {self.max_prompt_bytes}")


# -- requests ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generate:
    """Generate from `prompt` (text) or `prompt_ids` (exactly one is set)."""

    id: RequestId
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stream: bool = True
    deadline: float | None = None  # Unix time (s): not admitted after it

    def sampling(self) -> dict[str, Any]:
        """The SamplingParams fields of this request."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("id", "prompt", "prompt_ids", "stream", "deadline")}


@dataclass(frozen=True, slots=True)
class Abort:
    """Stop the generation `id` of the same client and free what it holds."""

    id: RequestId


@dataclass(frozen=True, slots=True)
class HealthQuery:
    id: RequestId | None = None  # echoed in the reply


@dataclass(frozen=True, slots=True)
class MetricsQuery:
    id: RequestId | None = None  # echoed in the reply


Request = Union[Generate, Abort, HealthQuery, MetricsQuery]

_FIELDS: dict[str, frozenset[str]] = {
    GENERATE: frozenset({"type", *(f.name for f in fields(Generate))}),
    ABORT: frozenset({"type", "id"}),
    HEALTH: frozenset({"type", "id"}),
    METRICS: frozenset({"type", "id"}),
}


def decode(body: bytes) -> dict[str, Any]:
    """One frame -> the msgpack map it holds; ProtocolError(malformed) otherwise, and before
    decoding when it nests deeper than MAX_DEPTH."""
    check_depth(body)
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except TypeError as exc:  # an array or a map as a map key: Python cannot hash it
        raise ProtocolError(MALFORMED, f"a map key is an array or a map ({exc})") from None
    except Exception as exc:  # msgpack raises several kinds for bad bytes
        raise ProtocolError(MALFORMED, f"the message is not valid msgpack ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(MALFORMED, f"the message must be a msgpack map, got "
                                       f"{_kind(obj)}")
    return obj


def encode(message: Mapping[str, Any]) -> bytes:
    """A reply (or request) map -> its frame."""
    return cast(bytes, msgpack.packb(message, use_bin_type=True))


def split_frames(frames: Sequence[bytes]) -> tuple[list[bytes], bytes]:
    """The frames after the ROUTER's identity -> (envelope to echo, body). The envelope is
    empty, or one empty delimiter frame."""
    if len(frames) == 1:
        return [], frames[0]
    if len(frames) == 2 and frames[0] == b"":
        return [b""], frames[1]
    raise ProtocolError(MALFORMED, f"expected one frame (optionally after an empty delimiter "
                                   f"frame), got {len(frames)} frames")


def request_id_of(obj: object) -> RequestId | None:
    """The request's id if it has a valid one (for error replies), else None."""
    if isinstance(obj, dict):
        value = obj.get("id")
        if _is_id(value):
            return cast(RequestId, value)
    return None


def parse_request(obj: object, limits: Limits = Limits()) -> Request:
    """A decoded message -> the request it is, checked; ProtocolError otherwise."""
    if not isinstance(obj, dict):
        raise ProtocolError(MALFORMED, f"the message must be a msgpack map, got {_kind(obj)}")
    rid = request_id_of(obj)
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:  # a map or an array is unhashable
        expected = ", ".join(sorted(_FIELDS))
        got = "no type" if "type" not in obj else f"type {_brief(kind)}"
        raise ProtocolError(UNKNOWN_TYPE, f"unknown request type: {got} (expected one of "
                                          f"{expected})", rid, "type")
    for key in obj:
        if not isinstance(key, str):
            raise ProtocolError(INVALID_REQUEST, f"field names must be strings, got "
                                                 f"{_show(key)}", rid)
        if key not in _FIELDS[kind]:
            # quoted unless plain: a newline or an escape code must not reach a log as is
            name = key if len(key) <= MAX_ID_CHARS and key.isprintable() else _brief(key)
            raise ProtocolError(INVALID_REQUEST, f"{name}: unknown field for {kind} (allowed: "
                                                 f"{', '.join(sorted(_FIELDS[kind]))})", rid, key)
    if kind in (HEALTH, METRICS):
        if obj.get("id") is not None and rid is None:
            raise ProtocolError(INVALID_REQUEST, f"id: expected a string of 1..{MAX_ID_CHARS} "
                                                 f"characters, an integer or nil, got "
                                                 f"{_show(obj['id'])}", None, "id")
        return HealthQuery(rid) if kind == HEALTH else MetricsQuery(rid)
    if "id" not in obj:
        raise ProtocolError(INVALID_REQUEST, f"id: missing (every {kind} needs one)", None, "id")
    if rid is None:
        raise ProtocolError(INVALID_REQUEST, f"id: expected a string of 1..{MAX_ID_CHARS} "
                                             f"characters or an integer, got "
                                             f"{_show(obj['id'])}", None, "id")
    if kind == ABORT:
        return Abort(rid)
    return _generate(obj, rid, limits)


def _generate(obj: dict[str, Any], rid: RequestId, limits: Limits) -> Generate:
    check = _Checker(obj, rid)
    has_text, has_ids = "prompt" in obj, "prompt_ids" in obj
    if has_text == has_ids:
        raise ProtocolError(INVALID_REQUEST, "prompt: give exactly one of prompt (text) and "
                                             "prompt_ids (token ids)", rid, "prompt")
    prompt = check.string("prompt") if has_text else None
    if prompt is not None:
        check_prompt_bytes(prompt, limits, rid)
    if has_ids and isinstance(obj["prompt_ids"], list):
        check_prompt_length(len(obj["prompt_ids"]), limits, rid)  # before reading each id
    prompt_ids = check.int_list("prompt_ids", allow_empty=False) if has_ids else None
    if prompt_ids is not None:
        if limits.vocab_size is not None:
            bad = [t for t in prompt_ids if not 0 <= t < limits.vocab_size]
            if bad:
                raise ProtocolError(INVALID_REQUEST, f"prompt_ids: {bad[:5]} are outside the "
                                                     f"vocabulary [0, {limits.vocab_size})",
                                    rid, "prompt_ids")
    stop = check.str_list("stop")
    if any(not s for s in stop):
        raise ProtocolError(INVALID_REQUEST, "stop: stop strings must be non-empty", rid, "stop")
    # every step checks every stop: bounded, so one request cannot slow everyone's steps
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ProtocolError(INVALID_REQUEST, f"stop: at most {MAX_STOP_STRINGS} strings of at "
                                             f"most {MAX_STOP_CHARS} characters", rid, "stop")
    stop_ids = check.int_list("stop_token_ids", allow_empty=True, low=0)
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise ProtocolError(INVALID_REQUEST, f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} "
                                             f"ids", rid, "stop_token_ids")
    return Generate(
        rid, prompt, prompt_ids,
        max_new_tokens=check.integer("max_new_tokens", DEFAULT_MAX_NEW_TOKENS, 1,
                                     limits.max_new_tokens),
        temperature=check.number("temperature", 0.0, low=0.0),
        top_p=check.number("top_p", 1.0, low=0.0, low_open=True, high=1.0),
        top_k=check.integer("top_k", 0, 0, None),
        seed=check.integer("seed", None, 0, MAX_SEED, nullable=True),
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=check.boolean("ignore_eos", False),
        stream=check.boolean("stream", True),
        deadline=check.number("deadline", None, low=0.0, nullable=True))


def check_deadline(request: Generate, now: float) -> None:
    """ProtocolError(deadline_exceeded) when `request`'s deadline is not after `now` (Unix
    time, seconds)."""
    if request.deadline is not None and request.deadline <= now:
        raise ProtocolError(DEADLINE_EXCEEDED, f"deadline: {request.deadline:.3f} passed "
                                               f"{now - request.deadline:.3f} s ago (server "
                                               f"time {now:.3f})", request.id, "deadline")


def detached(error: ProtocolError) -> ProtocolError:
    """`error` for a message whose id is that of another request in progress: an error with
    an id ends the request with that id, so this one carries nil and names the id."""
    if error.request_id is None:
        return error
    return ProtocolError(error.code, f"id {error.request_id!r}: {error.message}", None,
                         error.field)


def check_prompt_length(num_tokens: int, limits: Limits, rid: RequestId | None) -> None:
    """ProtocolError(prompt_too_long) when a prompt has more tokens than the server takes."""
    if limits.max_prompt_tokens is not None and num_tokens > limits.max_prompt_tokens:
        raise ProtocolError(PROMPT_TOO_LONG, f"prompt: {num_tokens} tokens; this server takes "
                                             f"at most {limits.max_prompt_tokens}", rid, "prompt")


def check_prompt_bytes(prompt: str, limits: Limits, rid: RequestId | None) -> None:
    """ProtocolError(prompt_too_long) when a text prompt's UTF-8 encoding is longer than the
    server takes: checked before tokenizing, whose cost grows with the text."""
    if limits.max_prompt_bytes is None or len(prompt) <= limits.max_prompt_bytes // 4:
        return  # a character is at most 4 bytes: no need to encode
    num_bytes = len(prompt.encode("utf-8", "surrogatepass"))
    if num_bytes > limits.max_prompt_bytes:
        raise ProtocolError(PROMPT_TOO_LONG, f"prompt: {num_bytes} bytes of text; this server "
                                             f"takes at most {limits.max_prompt_bytes}",
                            rid, "prompt")


def check_depth(body: bytes, max_depth: int = MAX_DEPTH) -> None:
    """ProtocolError(malformed) when the msgpack object at the start of `body` nests
    containers more than `max_depth` deep (a top-level map is depth 1)."""
    if nests_deeper(body, max_depth):
        raise ProtocolError(MALFORMED, f"the message nests containers more than "
                                       f"{max_depth} deep")
    if too_many_containers(body, MAX_CONTAINERS):  # megabytes of [] decode for seconds
        raise ProtocolError(MALFORMED, f"the message holds more than {MAX_CONTAINERS} maps "
                                       f"and arrays")


class _Checker:
    """Reads optional fields of one request, raising invalid_request naming the field."""

    def __init__(self, obj: dict[str, Any], rid: RequestId) -> None:
        self.obj, self.rid = obj, rid

    def fail(self, name: str, expected: str) -> ProtocolError:
        return ProtocolError(INVALID_REQUEST, f"{name}: expected {expected}, got "
                                              f"{_show(self.obj[name])}", self.rid, name)

    def string(self, name: str) -> str:
        value = self.obj[name]
        if not isinstance(value, str):
            raise self.fail(name, "a string")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int | None,
                nullable: bool = False) -> Any:
        if name not in self.obj:
            return default
        value = self.obj[name]
        if value is None and nullable:
            return None
        span = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise self.fail(name, span + (" or nil" if nullable else ""))
        return value

    def number(self, name: str, default: Any, low: float, high: float | None = None,
               low_open: bool = False, nullable: bool = False) -> Any:
        if name not in self.obj:
            return default
        value = self.obj[name]
        if value is None and nullable:
            return None
        if low_open:
            span = f"a number in ({low:g}, {high:g}]"
        else:
            span = f"a number >= {low:g}" if high is None else f"a number in [{low:g}, {high:g}]"
        span += " or nil" if nullable else ""
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            raise self.fail(name, span)
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise self.fail(name, span)
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        if name not in self.obj:
            return default
        value = self.obj[name]
        if not isinstance(value, bool):
            raise self.fail(name, "true or false")
        return value

    def int_list(self, name: str, allow_empty: bool, low: int | None = None
                 ) -> tuple[int, ...]:
        if name not in self.obj:
            return ()
        value = self.obj[name]
        expected = "a list of integers" + ("" if low is None else f" >= {low}") + (
            "" if allow_empty else " (not empty)")
        if (not isinstance(value, list) or (not value and not allow_empty)
                or not all(_is_int(v) and (low is None or v >= low) for v in value)):
            raise self.fail(name, expected)
        return tuple(value)

    def str_list(self, name: str) -> tuple[str, ...]:
        if name not in self.obj:
            return ()
        value = self.obj[name]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, "a list of strings")
        return tuple(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: object) -> bool:
    return _is_int(value) or (isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS)


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             bytes: "binary", list: "an array", dict: "a map", type(None): "nil"}
    return names.get(type(value), type(value).__name__)


class _BriefRepr(reprlib.Repr):
    """repr bounded in time whatever the value (8 MiB of bytes, deep arrays)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 2, 40, 40
        self.maxlist = self.maxtuple = self.maxdict = 4

    def repr_bytes(self, x: bytes, level: int) -> str:
        return self.repr_str(x, level)  # type: ignore[arg-type]  # slices before repr

    def repr_ExtType(self, x: msgpack.ExtType, level: int) -> str:
        return f"ExtType({x.code}, {self.repr_bytes(x.data, level)})"


_BRIEF = _BriefRepr()


def _brief(value: object) -> str:
    """A value's repr cut to at most 60 characters, for error messages."""
    text = _BRIEF.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _show(value: object) -> str:
    return f"{_kind(value)} {_brief(value)}"


# -- replies -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token; `text` is what it adds to the text (may be empty)."""

    id: RequestId
    index: int
    token_id: int
    text: str

    def wire(self) -> dict[str, Any]:
        return _wire(TOKEN, self)


@dataclass(frozen=True, slots=True)
class Final:
    """The end of a generation: why it stopped, everything it produced, usage, timings."""

    id: RequestId
    finish_reason: str  # "length", "stop", "abort" or "error: ..."
    token_ids: tuple[int, ...]
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tpot_s: float
    e2e_s: float

    def wire(self) -> dict[str, Any]:
        return {"type": FINAL, "id": self.id, "finish_reason": self.finish_reason,
                "token_ids": list(self.token_ids), "text": self.text,
                "usage": {"prompt_tokens": self.prompt_tokens,
                          "completion_tokens": self.completion_tokens},
                "timings": {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}}


@dataclass(frozen=True, slots=True)
class Aborted:
    """The abort of `id` is done: its final (or error) was sent before this."""

    id: RequestId

    def wire(self) -> dict[str, Any]:
        return _wire(ABORTED, self)


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The server and its engine now; `protocol_version` and `features` say what requests it
    takes (see the module docstring)."""

    status: str  # "ok"; "unresponsive" when the engine did not answer in time; "failed"
    model: str
    family: str
    vocab_size: int
    max_position_embeddings: int
    scheduler: str
    devices: tuple[str, ...]
    transport: str
    running: int
    waiting: int
    restarts: int = 0  # engine restarts after failures, in the last minute
    last_error: str | None = None  # the last failure of the engine, if any
    actor_restarts: int = 0  # actor processes restarted since the engine started
    last_actor_error: str | None = None  # why the last one was
    protocol_version: int = PROTOCOL_VERSION
    features: tuple[str, ...] = FEATURES
    id: RequestId | None = None  # the health request's id, if it had one

    def wire(self) -> dict[str, Any]:
        return _wire(HEALTH, self)


@dataclass(frozen=True, slots=True)
class MetricsReport:
    """Metrics.snapshot() of the engine."""

    fields: dict[str, Any] = field(default_factory=dict)
    id: RequestId | None = None  # the metrics request's id, if it had one

    def wire(self) -> dict[str, Any]:
        return {**self.fields, "type": METRICS, "id": self.id}


@dataclass(frozen=True, slots=True)
class ErrorReply:
    id: RequestId | None
    code: str
    message: str

    @staticmethod
    def of(error: ProtocolError) -> ErrorReply:
        return ErrorReply(error.request_id, error.code, error.message)

    def wire(self) -> dict[str, Any]:
        return _wire(ERROR, self)


Reply = Union[Token, Final, Aborted, HealthReport, MetricsReport, ErrorReply]


def _wire(kind: str, reply: Any) -> dict[str, Any]:
    """A flat reply as its map: "type", then its fields (tuples travel as arrays)."""
    return {"type": kind, **{f.name: getattr(reply, f.name) for f in fields(reply)}}
