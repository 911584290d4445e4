"""Stop strings are found in the output's text decoded a few tokens at a time: at the same
place as in the whole text, with work per token that does not grow with the output."""

import random

import pytest

from moeflow.models.tokenizer import IncrementalDecoder, Tokenizer
from moeflow.ops.sampling import SamplingParams
from moeflow.serve.engine import EngineCore, Request


class CountingTokenizer:
    def __init__(self, inner: Tokenizer) -> None:
        self.inner, self.decoded = inner, 0

    def decode(self, ids):
        ids = list(ids)
        self.decoded += len(ids)
        return self.inner.decode(ids)


class _Core:  # what EngineCore's stop check reads
    eos_ids: frozenset = frozenset()
    context = 1 << 30

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    _stop_reason = EngineCore._stop_reason
    text_of = EngineCore.text_of


@pytest.fixture(scope="module")
def tokenizer(tiny_factory):
    tok = Tokenizer.load(tiny_factory("qwen3_moe"))
    assert tok is not None
    return tok


def _run(core, ids, stop):
    req = Request(0, [1], SamplingParams(max_new_tokens=len(ids) + 1, stop=stop), 0.0)
    for token in ids:
        req.output_ids.append(token)
        reason = core._stop_reason(req, token)
        if reason is not None:
            return req, reason
    return req, None


WORDS = ("the", "expert", "router", "naïve", "café", "☕", "tokens", "über", "a", "of", "ends",
         "日本語", "stop", "\n", "...", "—", "x")


def _ids(tokenizer, rng, words):
    return tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(words)))


def test_stops_where_the_whole_text_has_it_first(tokenizer):
    rng = random.Random(0)
    for trial in range(60):
        ids = _ids(tokenizer, rng, 30)
        text = tokenizer.decode(ids)
        if len(text) < 30:
            continue
        at = rng.randrange(5, len(text) - 10)
        needle = text[at:at + rng.randrange(1, 6)]  # often spans tokens
        req, reason = _run(_Core(tokenizer), ids, (needle, "\x00never"))
        assert reason == "stop", (trial, needle)
        first = text.find(needle)
        assert _Core(tokenizer).text_of(req) == text[:first]
        # it stopped at the first token whose text completes the needle
        n = len(req.output_ids)
        assert needle in tokenizer.decode(ids[:n]) and needle not in tokenizer.decode(
            ids[:n - 1])


def test_a_long_output_costs_the_same_per_token(tokenizer):
    rng = random.Random(1)
    ids = _ids(tokenizer, rng, 1500)
    assert len(ids) > 2000
    counting = CountingTokenizer(tokenizer)
    req, reason = _run(_Core(counting), ids, ("\x00never",))
    assert reason is None and len(req.output_ids) == len(ids)
    # a handful of ids decoded per token (the whole output each token: ~4.5 M)
    assert counting.decoded < 20 * len(ids)
    assert req.stop_text == tokenizer.decode(ids)


def test_incremental_decoder_holds_back_a_partial_character(tokenizer):
    text = "naïve café ☕ done"
    ids = tokenizer.encode(text)
    decoder, out = IncrementalDecoder(tokenizer), []
    for n in range(1, len(ids) + 1):
        piece = decoder.step(ids[:n])
        assert "\ufffd" not in piece
        out.append(piece)
    assert "".join(out) == text


class ByteTokenizer:
    """Tokens of raw bytes, some of them half a character."""

    VOCAB = {1: b"Hello", 2: b" END\xe4", 3: b"\xb8\xad", 4: b"!"}

    def decode(self, ids):
        return b"".join(self.VOCAB[i] for i in ids).decode("utf-8", "replace")


def test_a_stop_string_ending_where_a_character_begins_stops_at_once():
    """The token completing "END" also carries the first byte of the next character: the
    stop is found on that token, not one later (the text then ends before the stop)."""
    core = _Core(ByteTokenizer())
    req, reason = _run(core, [1, 2, 3, 4], ("END",))
    assert reason == "stop" and req.output_ids == [1, 2]
    assert core.text_of(req) == "Hello "
