"""The engine through the LLM API: batching, memory pressure, stops, validation, sampling."""

from __future__ import annotations

import json

import pytest

from moeflow.cli import main as cli_main
from moeflow.serve.build import build_engine_core
from moeflow.serve.llm import LLM
from moeflow.ops.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 2, 99], [250, 7], [8, 9, 10, 11, 300, 301, 302, 40, 41]]


@pytest.fixture(scope="module")
def path(tiny_factory):
    return tiny_factory("qwen3_moe")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def test_batched_generation_equals_one_at_a_time(path):
    llm = LLM(path, devices="cpu:0,cpu:1")
    together = llm.generate(PROMPTS, sampling=greedy(12))
    alone = [llm.generate(p, sampling=greedy(12))[0] for p in PROMPTS]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in together)


def test_small_kv_cache_preempts_and_recomputes_without_changing_tokens(path):
    roomy = LLM(path).generate(PROMPTS * 2, sampling=greedy(20))
    # 3 blocks of 16 tokens: six sequences of up to 29 tokens cannot all stay resident
    engine = build_engine_core(path, kv_cache_tokens=48, max_batch_tokens=16)
    reqs = [engine.add_request(p, greedy(20)) for p in PROMPTS * 2]
    while engine.has_unfinished():
        engine.step()
    assert sum(s.num_preemptions for s in engine.book.seqs.values()) > 0
    assert [tuple(r.output_ids) for r in reqs] == [c.token_ids for c in roomy]
    assert engine.executor.free_kv_blocks() == {"cpu:0": 3}  # everything freed
    assert engine.book.free_kv_blocks() == {"cpu:0": 3}


def test_long_prompt_is_prefilled_in_chunks(path):
    prompt = list(range(3, 200))
    whole = LLM(path).generate(prompt, sampling=greedy(5))[0]
    chunked = LLM(path, max_batch_tokens=32).generate(prompt, sampling=greedy(5))[0]
    assert chunked.token_ids == whole.token_ids


def test_stops(path):
    llm = LLM(path)
    free = llm.generate(PROMPTS[0], sampling=greedy(10))[0].token_ids
    stop_at = free[3]
    out = llm.generate(PROMPTS[0], sampling=SamplingParams(
        max_new_tokens=10, stop_token_ids=(stop_at,), ignore_eos=True))[0]
    assert out.token_ids == free[:free.index(stop_at) + 1] and out.finish_reason == "stop"
    text = llm.generate(PROMPTS[0], sampling=greedy(10))[0].text
    needle = text[2:5]
    cut = llm.generate(PROMPTS[0], sampling=SamplingParams(
        max_new_tokens=10, stop=(needle,), ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and needle not in cut.text and text.startswith(cut.text)


def test_eos_ends_generation_unless_ignored(path, tiny_factory):
    llm = LLM(path)
    free = llm.generate(PROMPTS[1], sampling=greedy(8))[0].token_ids
    eos_path = tiny_factory("qwen3_moe", eos_token_id=free[2])
    out = LLM(eos_path).generate(PROMPTS[1], max_new_tokens=8)[0]
    assert out.token_ids == free[:3] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed(path):
    llm = LLM(path)
    a = llm.generate(PROMPTS[0], sampling=SamplingParams(max_new_tokens=12, temperature=1.0,
                                                         seed=7, ignore_eos=True))[0]
    b = llm.generate(PROMPTS[0], sampling=SamplingParams(max_new_tokens=12, temperature=1.0,
                                                         seed=7, ignore_eos=True))[0]
    c = llm.generate(PROMPTS[0], sampling=SamplingParams(max_new_tokens=12, temperature=1.0,
                                                         seed=8, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids != c.token_ids


@pytest.mark.parametrize("prompt,match", [
    ([], "empty"), ([1, 2, 100000], "outside the vocabulary"), ([True, 2], "ints"),
    ([3 + i % 500 for i in range(2100)], "context holds 2048"),
])
def test_bad_prompts_are_refused(path, prompt, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LLM(path).generate([prompt] if prompt == [] else prompt, max_new_tokens=2)


def test_bad_devices_are_refused(path):
    with pytest.raises(ValueError, match="bad device 'gpu0'"):
        LLM(path, devices="gpu0")
    with pytest.raises(ValueError, match="listed twice"):
        LLM(path, devices="cpu:0,cpu:0")


def test_cli_generate_json_graph_and_make_tiny(tmp_path, capsys):
    model = tmp_path / "m"
    assert cli_main(["make-tiny", "olmoe", str(model), "--layers", "2", "--experts", "4"]) == 0
    assert (model / "config.json").exists() and (model / "tokenizer.json").exists()
    capsys.readouterr()
    assert cli_main(["generate", str(model), "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                     "--devices", "cpu:0,cpu:1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 4 and isinstance(out["text"], str)
    assert out["token_ids"] == list(LLM(model).generate([1, 2, 3], max_new_tokens=4)[0].token_ids)
    assert cli_main(["graph", str(model), "--out", str(tmp_path / "g.html"), "--layer", "1"]) == 0
    assert "<svg" in (tmp_path / "g.html").read_text()
    assert cli_main(["graph", str(model), "--out", str(tmp_path / "g.dot")]) == 0
    assert (tmp_path / "g.dot").read_text().startswith("digraph")
    assert cli_main(["graph", str(model), "--out", str(tmp_path / "g.png")]) == 2
    assert cli_main(["graph", str(model), "--out", str(tmp_path / "g.dot"), "--layer", "9"]) == 2


def test_a_request_added_without_streaming_gets_only_its_final_event(path):
    """AsyncEngine.add(stream=False), as LLM.generate adds: no TokenEvents, and the final
    event is the streamed request's (tokens, text, counts); the engine counts its tokens."""
    import asyncio

    from moeflow.serve.async_engine import AsyncEngine
    from moeflow.serve.events import FinalEvent

    async def run() -> tuple[list[list[object]], int]:
        async with AsyncEngine.from_pretrained(path, devices="cpu:0,cpu:1") as engine:
            seen = []
            for stream in (True, False):
                rid = await engine.add(PROMPTS[2], greedy(6), stream=stream)
                seen.append([event async for event in engine.events(rid)])
            return seen, engine.metrics.generated_tokens

    (streamed, quiet), generated = asyncio.run(run())
    assert [type(e).__name__ for e in streamed] == ["TokenEvent"] * 6 + ["FinalEvent"]
    assert len(quiet) == 1 and isinstance(quiet[0], FinalEvent)
    a, b = streamed[-1], quiet[0]
    assert (a.token_ids, a.text, a.finish_reason, a.completion_tokens) == (
        b.token_ids, b.text, b.finish_reason, b.completion_tokens)
    assert len(b.token_ids) == 6 and generated == 12


def test_abort_by_id_ends_the_readers_stream_with_a_final_event(path):
    """AsyncEngine.abort(id): whoever reads the request's events gets its FinalEvent
    ("abort", the tokens so far), streamed or not; the engine then holds nothing of it."""
    import asyncio

    from moeflow.serve.async_engine import AsyncEngine
    from moeflow.serve.events import FinalEvent

    async def run() -> list[tuple[list[object], int]]:
        async with AsyncEngine.from_pretrained(path) as engine:
            out = []
            for stream in (True, False):
                rid = await engine.add(PROMPTS[0], greedy(100_000), stream=stream)
                reader = asyncio.create_task(_collect(engine.events(rid)))
                await engine.call(lambda core: core.step())  # a token or two in
                await engine.abort(rid)
                events = await asyncio.wait_for(reader, 30)
                out.append((events, await engine.call(lambda core: len(core.requests))))
            return out

    for events, held in asyncio.run(run()):
        final = events[-1]
        assert isinstance(final, FinalEvent) and final.finish_reason == "abort"
        assert all(not isinstance(e, FinalEvent) for e in events[:-1])
        assert held == 0


def test_a_request_cancelled_before_admission_is_withdrawn(path):
    """A caller cancelled while its request waits to be admitted (the engine busy): the
    request is aborted once admitted, not run to max_new_tokens holding KV."""
    import asyncio
    import threading

    from moeflow.serve.async_engine import AsyncEngine

    async def run() -> tuple[int, int, list[int]]:
        async with AsyncEngine.from_pretrained(path) as engine:
            gate = threading.Event()
            busy = asyncio.ensure_future(engine.call(lambda core: gate.wait(30)))
            adding = asyncio.create_task(engine.add(PROMPTS[1], greedy(100_000)))
            await asyncio.sleep(0.05)  # the add waits behind the busy engine
            adding.cancel()
            with pytest.raises(asyncio.CancelledError):
                await adding
            gate.set()
            await busy
            for _ in range(20):  # a step or two for the abort to land
                await engine.call(lambda core: core.step())
            held = await engine.call(lambda core: (len(core.requests),
                                                   core.num_unfinished))
            free = await engine.call(lambda core: list(core.executor.free_kv_blocks().values()))
            capacity = await engine.call(
                lambda core: list(core.executor.kv_capacity_blocks().values()))
            return held[0], held[1], [c - f for c, f in zip(capacity, free)]

    requests, unfinished, used = asyncio.run(run())
    assert (requests, unfinished) == (0, 0) and used == [0] * len(used)


async def _collect(events):
    return [event async for event in events]
