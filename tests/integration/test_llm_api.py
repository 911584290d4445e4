"""The Python APIs' promises that a caller relies on: an LLM given a whole EngineConfig
batches as one given a path, logprobs reach a caller who does not stream, stop strings
that cannot match are refused, and wait_stopped() returns once the engine is stopped."""

from __future__ import annotations

import asyncio

import pytest

from moeflow.ops.sampling import SamplingParams
from moeflow.serve.async_engine import AsyncEngine, OverloadedError
from moeflow.serve.config import EngineConfig
from moeflow.serve.llm import LLM


@pytest.fixture(scope="module")
def path(tiny_factory):
    return tiny_factory("qwen3_moe")


def greedy(n: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kwargs)


def test_a_batch_larger_than_max_waiting_waits_instead_of_failing(path):
    """LLM(EngineConfig(...)) keeps the config's max_waiting (1024 by default): a batch of
    more prompts than that is admitted as earlier ones finish, with the tokens each gets
    alone, instead of OverloadedError for all of it."""
    prompts = [[5 + i % 40, 17, 33] for i in range(7)]
    with LLM(path) as roomy, LLM(EngineConfig(str(path), max_waiting=2)) as tight:
        alone = roomy.generate(prompts, sampling=greedy(6))
        queued = tight.generate(prompts, sampling=greedy(6))
        assert [c.token_ids for c in queued] == [c.token_ids for c in alone]
        assert tight.engine.num_unfinished == 0 and not tight._async._streams


def test_another_callers_full_queue_still_answers_overloaded(path):
    """With nothing of its own in progress to wait for, LLM.generate raises
    OverloadedError as before (the queue is full of someone else's requests)."""
    with LLM(EngineConfig(str(path), max_waiting=1)) as llm:
        async def fill_and_try() -> None:
            rid = await llm._async.add([1, 2, 3], greedy(100_000), stream=False)
            try:
                with pytest.raises(OverloadedError):
                    await llm._generate_all([[4, 5]], greedy(2))
            finally:
                llm._async.drop(rid)

        llm._loop.run(fill_and_try())


def test_logprobs_reach_a_caller_who_does_not_stream(path):
    """SamplingParams(logprobs=N) through LLM.generate (stream=False underneath): the
    Completion carries each token's log-probability and top N, as TokenEvents do."""
    params = greedy(5, logprobs=3)
    with LLM(path) as llm:
        [out] = llm.generate([5, 17, 33], sampling=params)
        assert llm.generate([5, 17, 33], sampling=greedy(5))[0].logprobs is None

        async def streamed() -> list[object]:
            return [e.logprobs async for e in llm._async.generate([5, 17, 33], params)
                    if not hasattr(e, "finish_reason")]

        per_token = llm._loop.run(streamed())
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 5
    assert list(out.logprobs) == per_token
    for token, (logprob, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 3 and top[0][0] == token and logprob == top[0][1]  # greedy


def test_stop_strings_without_a_tokenizer_are_refused(tiny_factory):
    """A checkpoint without tokenizer.json has no text to find a stop string in: asking
    for one is an error, not a request that silently runs to max_new_tokens."""
    path = tiny_factory("qwen3_moe", tokenizer=False)
    with LLM(path) as llm:
        with pytest.raises(ValueError, match="stop strings need"):
            llm.generate([1, 2, 3], sampling=greedy(4, stop=("a",)))
        out = llm.generate([1, 2, 3], sampling=greedy(4, stop_token_ids=(7,)))[0]
        assert out.finish_reason in ("length", "stop")


def test_wait_stopped_returns_after_stop(path):
    async def run() -> object:
        engine = AsyncEngine.from_pretrained(path)
        assert engine.health()["status"] == "stopped"  # not started
        await engine.start()
        assert engine.health()["status"] == "ok"
        waiter = asyncio.create_task(engine.wait_stopped())
        await engine.stop()
        assert engine.health() == {"status": "stopped", "restarts": 0, "last_error": None}
        return await asyncio.wait_for(waiter, 10)

    assert asyncio.run(run()) is None


def test_prompts_of_numpy_integers_and_bytes(path):
    """Token ids may be numpy's integers (a tokenizer's output, an array's items); bytes
    are no prompt (they would read as token ids), nor are both sampling forms at once."""
    import numpy as np

    with LLM(path) as llm:
        [ints] = llm.generate([5, 17, 33], max_new_tokens=4)
        [nps] = llm.generate(list(np.array([5, 17, 33])), max_new_tokens=4)
        assert nps.token_ids == ints.token_ids and nps.prompt_token_ids == (5, 17, 33)
        assert type(nps.prompt_token_ids[0]) is int
        for bad in (b"hi", bytearray(b"hi"), [b"hi"]):
            with pytest.raises(TypeError, match="bytes|prompt"):
                llm.generate(bad, max_new_tokens=2)
        with pytest.raises(TypeError, match="not both"):
            llm.generate([5], max_new_tokens=2, sampling=greedy(3))


def test_a_requests_events_are_read_once(path):
    """Reading a finished request's events again says why, not a bare KeyError: 8."""
    async def run() -> None:
        async with AsyncEngine.from_pretrained(path) as engine:
            rid = await engine.add([5, 17, 33], greedy(2), stream=False)
            events = [e async for e in engine.events(rid)]
            assert len(events) == 1 and events[0].finish_reason == "length"
            with pytest.raises(KeyError, match="already read"):
                [e async for e in engine.events(rid)]

    asyncio.run(run())
