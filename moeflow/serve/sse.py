"""Server-sent events of the OpenAI API: one `data: {json}` chunk per generated token,
each built from a prefix formatted once per call (the per-token cost is one json.dumps of
the text), and the hold-back that keeps a stop string out of a stream."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from typing import Any

from moeflow.ops.sampling import Logprobs

from moeflow.serve.openai_schema import Call


class HoldBack:
    """Streamed text never shows a stop string: text that could be the start of one waits
    until the next token shows it is not (the final text, cut by the engine, ends it)."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.keep = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def add(self, piece: str) -> str:
        if not self.stop:  # nothing to hold back, or to keep
            self.sent += len(piece)
            return piece
        self.text += piece
        end = len(self.text) - self.keep
        start = max(0, self.sent - self.keep - len(piece))
        for s in self.stop:
            hit = self.text.find(s, start)
            if hit >= 0:
                end = min(end, hit)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def rest(self, final_text: str | None) -> str:
        """What is left to send once the request ended (its authoritative final text, or
        None when it was aborted: then the text so far, short of any stop string)."""
        if final_text is None:
            if not self.stop:
                return ""
            final_text = self.text
            for s in self.stop:
                hit = final_text.find(s)
                if hit >= 0:
                    final_text = final_text[:hit]
        return final_text[self.sent:] if len(final_text) > self.sent else ""


class Chunks:
    """The SSE chunks of one call, built from a prefix computed once."""

    def __init__(self, call: Call) -> None:
        self.call = call
        head = {"id": call.id, "object": "chat.completion.chunk" if call.chat
                else "text_completion", "created": call.created, "model": call.model}
        self.prefix = b"data: " + json.dumps(head)[:-1].encode() + b', "choices": [{"index": 0, '
        self.suffix = (b', "usage": null}\n\n' if call.include_usage else b"}\n\n")

    def _choice(self, text: str, reason: str | None, role: bool = False,
                ids: list[int] | None = None, logprobs: Any = None) -> bytes:
        finish = json.dumps(reason).encode()
        if self.call.chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text}
            body = b'"delta": ' + json.dumps(delta).encode()
        else:
            body = b'"text": ' + json.dumps(text).encode()
        if self.call.return_token_ids and ids is not None:
            body += b', "token_ids": ' + json.dumps(ids).encode()
        return (self.prefix + body + b', "logprobs": ' + json.dumps(logprobs).encode()
                + b', "finish_reason": ' + finish + b"}]" + self.suffix)

    def first(self) -> bytes:
        return self._choice("", None, role=True)

    def token(self, text: str, token_id: int, logprobs: Any = None) -> bytes:
        return self._choice(text, None, ids=[token_id], logprobs=logprobs)

    def last(self, text: str, reason: str, ids: list[int], logprobs: Any = None) -> bytes:
        return self._choice(text, reason, ids=ids, logprobs=logprobs)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        call = self.call
        return sse_json({"id": call.id, "object": "chat.completion.chunk" if call.chat
                          else "text_completion", "created": call.created, "model": call.model,
                          "choices": [], "usage": {
                              "prompt_tokens": prompt_tokens,
                              "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}})


class LogprobsFormat:
    """Log-probabilities in OpenAI's two shapes: completions' (parallel lists of tokens,
    their log-probabilities, the top tokens as {token: log-probability} and text offsets)
    and chat's (a `content` list of {token, logprob, bytes, top_logprobs}). A token is
    named by its own text, decoded alone; one that holds only part of a character, as
    OpenAI names it: "bytes:" and its bytes escaped (`\\xe5`), with those bytes in chat's
    `bytes`, so that a client joining them gets the text back. A completion's text offset
    moves when a character is complete."""

    def __init__(self, chat: bool, token_bytes: Callable[[int], bytes]) -> None:
        self.chat, self.token_bytes = chat, token_bytes
        self.offset = 0  # completions: where the next token's text starts
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def of(self, token_id: int, logprobs: Logprobs) -> dict[str, Any]:
        """One token's, as a stream chunk carries it."""
        lp, top = _finite(logprobs[0]), [(i, _finite(v)) for i, v in logprobs[1]]
        raw = self.token_bytes(token_id)
        text = token_name(raw)
        if self.chat:
            return {"content": [{"token": text, "logprob": lp, "bytes": list(raw),
                                 "top_logprobs": [
                                     {"token": token_name(b := self.token_bytes(i)),
                                      "logprob": v, "bytes": list(b)} for i, v in top]}]}
        tops: dict[str, float] = {}
        for i, v in top:  # tokens that decode alike: the likeliest one's (they come first)
            tops.setdefault(token_name(self.token_bytes(i)), v)
        if top:  # OpenAI's "up to logprobs+1": the sampled token is always among them
            tops.setdefault(text, lp)
        entry = {"tokens": [text], "token_logprobs": [lp], "top_logprobs": [tops],
                 "text_offset": [self.offset]}
        self.offset += len(self.utf8.decode(raw))  # the characters it completes
        return entry

    def join(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """A whole completion's, from its tokens' (`of`)."""
        if self.chat:
            return {"content": [c for part in parts for c in part["content"]]}
        return {key: [v for part in parts for v in part[key]]
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def token_name(raw: bytes) -> str:
    """A token's name in log-probabilities: its text, or, when its bytes are not whole
    UTF-8 characters, "bytes:" and the bytes escaped, as OpenAI writes it."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _finite(logprob: float) -> float:
    """-inf (a token the model rules out) as JSON can carry it, as vLLM does."""
    return logprob if logprob > -9999.0 else -9999.0


def sse_json(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"
