"""What an engine hands its callers: a TokenEvent per generated token, then one FinalEvent
per request; and the errors it raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


class OverloadedError(RuntimeError):
    """The admission queue is full; try again later."""


class EngineStopped(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token and the text it completes (possibly empty mid-character).
    `last`: the request ends with this token (its FinalEvent comes next, at once).
    `logprobs`: if the request asked, the token's log-probability and the top tokens'
    (id, log-probability), most likely first."""

    request_id: int
    index: int
    token_id: int
    text: str
    last: bool = False
    logprobs: tuple[float, tuple[tuple[int, float], ...]] | None = None


@dataclass(frozen=True, slots=True)
class FinalEvent:
    request_id: int
    finish_reason: str  # "length", "stop", "abort", or "error: ..."
    token_ids: tuple[int, ...]
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tpot_s: float
    e2e_s: float
    # if the request asked (`SamplingParams.logprobs`): per generated token, as on its
    # TokenEvent; so a request added with stream=False (and `moeflow.LLM`) gets them too
    logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] | None = None

    @property
    def error(self) -> str | None:
        return self.finish_reason if self.finish_reason.startswith("error") else None

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    @property
    def timings(self) -> dict[str, float]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}


Event = Union[TokenEvent, FinalEvent]
