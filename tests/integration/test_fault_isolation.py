"""One request, or one failure inside the engine, never takes the others down.

Per-request boundaries (sampling, stop checks, detokenizing) fail that request alone; a
failure of the engine thread itself fails the requests in progress, rebuilds the engine and
goes on, and gives up (reporting why) only after repeated failures; `LLM` and
`moeflow generate` always exit by themselves.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import moeflow.actors.core as actor_core
from moeflow.serve.async_engine import (AsyncEngine, EngineStopped, FinalEvent,
                                        RESTART_WINDOW_S)
from moeflow.serve.engine import EngineCore
from moeflow.ops.sampling import SamplingParams

PROMPT = [5, 17, 33, 2, 99]
# values the protocol accepts that once overflowed the sampler
EXTREMES = [SamplingParams(max_new_tokens=4, temperature=1e-45, seed=1),
            SamplingParams(max_new_tokens=4, temperature=5e-324, seed=1),
            SamplingParams(max_new_tokens=4, temperature=0.8, top_p=1e-300, seed=1),
            SamplingParams(max_new_tokens=4, temperature=1e30, top_k=1, seed=1),
            SamplingParams(max_new_tokens=4, temperature=1.0, top_p=1e-300, top_k=3,
                           seed=(1 << 64) - 1)]
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_factory):
    return tiny_factory("qwen3_moe")


async def final_of(engine: AsyncEngine, prompt: Any, params: SamplingParams) -> FinalEvent:
    async with asyncio.timeout(60):
        async for event in engine.generate(prompt, params):
            if isinstance(event, FinalEvent):
                return event
    raise AssertionError("no final event")


@pytest.mark.parametrize("transport", ["inproc", "zmq"])
def test_extreme_sampling_values_complete_and_the_next_request_succeeds(path, transport):
    async def main() -> None:
        async with AsyncEngine.from_pretrained(path, devices="cpu:0,cpu:1",
                                               transport=transport) as engine:
            reference = await final_of(engine, PROMPT, GREEDY)
            for params in EXTREMES:
                final = await final_of(engine, PROMPT, params)
                assert final.error is None and final.completion_tokens >= 1, final
            # tiny temperatures and top_p are greedy in effect: the argmax
            assert (await final_of(engine, PROMPT, EXTREMES[0])).token_ids == \
                reference.token_ids[:4]
            assert (await final_of(engine, PROMPT, GREEDY)).token_ids == reference.token_ids
            assert engine.health()["status"] == "ok"
            assert engine.health()["restarts"] == 0

    asyncio.run(main())


def test_a_failing_sampler_fails_its_request_alone(path, monkeypatch):
    real = actor_core.sample

    def sample(logits: Any, params: SamplingParams, generator: Any) -> int:
        if params.seed == 666:
            raise FloatingPointError("poisoned")
        return real(logits, params, generator)

    monkeypatch.setattr(actor_core, "sample", sample)

    async def main() -> None:
        async with AsyncEngine.from_pretrained(path, devices="cpu:0,cpu:1") as engine:
            alone = await final_of(engine, PROMPT, GREEDY)
            poisoned = SamplingParams(max_new_tokens=6, temperature=0.5, seed=666)
            bad, good = await asyncio.gather(final_of(engine, [7, 8, 9], poisoned),
                                             final_of(engine, PROMPT, GREEDY))
            assert bad.error is not None and "sampling failed" in bad.error
            assert "poisoned" in bad.error
            assert good.error is None and good.token_ids == alone.token_ids
            # nothing is left behind on any actor
            samplers = await engine.call(
                lambda core: sum(len(a.samplers) for a in core.executor.actors.values()))
            assert samplers == 0
            assert engine.health()["restarts"] == 0

    asyncio.run(main())


def test_an_engine_failure_fails_the_requests_in_progress_then_the_engine_restarts(
        path, monkeypatch, tmp_path):
    real = EngineCore.complete
    failures = {"left": 1}

    def complete(self: EngineCore, job: Any, result: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("a bug in the engine")
        return real(self, job, result)

    monkeypatch.setattr(EngineCore, "complete", complete)

    async def main() -> None:
        async with AsyncEngine.from_pretrained(path, devices="cpu:0,cpu:1",
                                               trace=str(tmp_path / "run.json")) as engine:
            failed = await final_of(engine, PROMPT, GREEDY)
            assert failed.error is not None and "a bug in the engine" in failed.error
            assert "restarted" in failed.error
            ok = await final_of(engine, PROMPT, GREEDY)
            assert ok.error is None and ok.completion_tokens == 6
            health = engine.health()
            assert health["status"] == "ok" and health["restarts"] == 1
            assert "a bug in the engine" in health["last_error"]

    asyncio.run(main())
    # the trace up to the failure is kept; the restarted engine traces to a file of its own
    before = json.loads((tmp_path / "run.json").read_text())["metadata"]
    after = json.loads((tmp_path / "run.restart1.json").read_text())["metadata"]
    assert before["num_jobs"] == 1 and after["num_jobs"] == 6  # a prefill, 5 decode steps


def test_an_engine_that_keeps_failing_gives_up_and_says_why(path, monkeypatch):
    def complete(self: EngineCore, job: Any, result: Any) -> Any:
        raise RuntimeError("always broken")

    monkeypatch.setattr(EngineCore, "complete", complete)

    async def main() -> None:
        async with AsyncEngine.from_pretrained(path) as engine:
            errors = []
            for _ in range(10):
                try:
                    errors.append((await final_of(engine, PROMPT, GREEDY)).error)
                except EngineStopped as exc:
                    errors.append(str(exc))
                    break
            assert all(e is not None for e in errors)
            async with asyncio.timeout(30):
                why = await engine.wait_stopped()
            assert why is not None and "always broken" in why
            assert engine.health()["status"] == "failed"
            with pytest.raises(EngineStopped, match="always broken|not running"):
                await final_of(engine, PROMPT, GREEDY)

    assert RESTART_WINDOW_S >= 10  # the ten tries above fall in one window
    asyncio.run(main())


@pytest.mark.parametrize("transport", ["inproc", "zmq"])
def test_moeflow_generate_with_extreme_values_exits_by_itself(path, transport):
    for flags in (["--temperature", "1e-45"], ["--temperature", "1", "--top-p", "1e-300"]):
        run = subprocess.run(
            [sys.executable, "-m", "moeflow.cli", "generate", str(path), "--prompt-ids",
             "1,2,3", "--max-new-tokens", "4", "--transport", transport, *flags],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run.stderr[-2000:]


def test_an_actor_that_dies_while_idle_is_restarted_before_the_next_request(path):
    async def main() -> None:
        async with AsyncEngine.from_pretrained(path, devices="cpu:0,cpu:1",
                                               transport="zmq") as engine:
            first = await final_of(engine, PROMPT, GREEDY)
            assert engine.health()["actor_restarts"] == 0
            pids = await engine.call(lambda core: core.executor.pids())
            os.kill(pids["cpu:1"], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = await engine.call(lambda core: core.executor.pids())
                if now["cpu:1"] != pids["cpu:1"]:
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("the dead actor was not restarted while idle")
            again = await final_of(engine, PROMPT, GREEDY)
            assert again.error is None and again.token_ids == first.token_ids
            health = engine.health()  # what health reports say of it
            assert health["actor_restarts"] == 1 and health["status"] == "ok"
            assert "actor cpu:1 died" in health["last_actor_error"]

    asyncio.run(main())


def test_a_request_whose_actor_dies_mid_generation_runs_again_and_completes(path, caplog):
    """Killed while a request decodes, the actor is restarted and the request runs again,
    recomputed from its prompt and its tokens so far: its stream pauses, and it ends with
    the tokens of an unfaulted run."""
    params = SamplingParams(max_new_tokens=300, ignore_eos=True)

    async def main() -> None:
        async with AsyncEngine.from_pretrained(path, devices="cpu:0,cpu:1",
                                               transport="zmq") as engine:
            expected = await final_of(engine, PROMPT, params)
            pids = await engine.call(lambda core: core.executor.pids())
            streamed: list[int] = []
            final = None
            async with asyncio.timeout(120):
                async for event in engine.generate(PROMPT, params):
                    if isinstance(event, FinalEvent):
                        final = event
                        continue
                    streamed.append(event.token_id)
                    if len(streamed) == 4:
                        os.kill(pids["cpu:1"], signal.SIGKILL)
            assert final is not None and final.error is None, final
            assert final.token_ids == expected.token_ids
            assert streamed == list(expected.token_ids)  # each token streamed once
            assert engine.health()["actor_restarts"] == 1
            text = engine.metrics.prometheus().splitlines()
            assert "moeflow:request_retries_total 1" in text
            assert "moeflow:num_preemptions_total 1" in text  # its KV, dropped to recompute

    with caplog.at_level("WARNING", logger="moeflow.engine"):
        asyncio.run(main())
    assert any("runs again" in r.getMessage() and "retry 1 of 1" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_request_runs_again_once_then_fails_if_it_loses_its_actor_again(path):
    """A job failed for no fault of its requests (`retry`) runs them again, once: a second
    such failure ends them with the error, so a request that kills its actor cannot keep
    doing so."""
    from moeflow.serve.build import build_engine_core

    core = build_engine_core(path)
    run_many, failures = core.executor.run_many, []

    def failing(jobs):  # every job fails as an actor's death fails it
        results = run_many(jobs)
        for r in results:
            failures.append(r.job_id)
            r.tokens, r.error, r.retry = {}, "actor cpu:0 died (killed)", True
        return results

    try:
        core.executor.run_many = failing
        req = core.add_request(PROMPT, GREEDY)
        events = []
        for _ in range(10):
            events += core.step()
            if req.finished:
                break
        assert len(failures) == 2 and req.retries == 1
        assert req.finish_reason == ("error: actor cpu:0 died (killed) (it had already run "
                                     "again 1x after losing an actor)")
        assert [e.finish_reason for e in events] == [req.finish_reason]
        core.executor.run_many = run_many  # the next request is served as usual
        again = core.add_request(PROMPT, GREEDY)
        while not again.finished:
            core.step()
        assert again.finish_reason == "length" and len(again.output_ids) == 6
    finally:
        core.executor.close()


def test_a_job_back_after_its_device_was_lost_runs_its_request_again(path):
    """Two units in flight (fine-ep); the second finishes on its home, then that actor dies
    while the first still runs: the first fails (`retry`, `lost`), and the second comes back
    after the loss was taken in, its KV gone. It must run again, not resume where its
    cache no longer is (it failed with 'not cached here', its retry unused)."""
    from moeflow.serve.build import build_engine_core

    core = build_engine_core(path, devices="cpu:0,cpu:1", scheduler="fine-ep")
    executor, steps = core.executor, []
    run_many = executor.run_many

    def dies_after_the_second(jobs):
        results = run_many(jobs)
        steps.append(len(jobs))
        if len(steps) == 3:
            assert len(jobs) == 2
            victim = jobs[1].unit.seqs[0].home
            first = results[0]
            first.tokens, first.error, first.retry = {}, f"actor {victim} died (killed)", True
            first.lost = (victim,)
            worker = executor.actors[victim].worker  # what a restart leaves: no KV
            for seq_id in list(worker.kv.seqs):
                worker.release(seq_id)
        return results

    executor.run_many = dies_after_the_second
    a, b = core.add_request(PROMPT, GREEDY), core.add_request(PROMPT[::-1], GREEDY)
    for _ in range(30):
        core.step()
        if a.finished and b.finished:
            break
    assert (a.finish_reason, b.finish_reason) == ("length", "length")
    assert (a.retries, b.retries) == (1, 1)
    executor.run_many = run_many
    for want, req in ((a, PROMPT), (b, PROMPT[::-1])):
        again = core.add_request(req, GREEDY)
        while not again.finished:
            core.step()
        assert again.output_ids == want.output_ids  # recomputed, as if nothing happened
    assert core.book.kv_used == {"cpu:0": 0, "cpu:1": 0}


def test_a_request_failed_for_a_lost_device_frees_its_kv_where_it_was_kept(path):
    """cgopipe keeps a request's KV on the host (cpu:1), not its home (cpu:0). When the
    home is lost and the request may not run again, the host frees its blocks too."""
    from moeflow.serve.build import build_engine_core

    core = build_engine_core(path, devices="cpu:0,cpu:1", scheduler="cgopipe")
    assert core.scheduler.kv_devices(core.spec, core.cluster) == {"cpu:0": "cpu:1"}
    req = core.add_request(PROMPT, SamplingParams(max_new_tokens=20, ignore_eos=True))
    for _ in range(3):
        core.step()
    host = core.executor.actors["cpu:1"].worker.kv
    assert req.request_id in host.seqs
    req.retries = 1  # its one retry spent
    [event] = core.lose("cpu:0")
    assert event.finished and req.finish_reason == (
        "error: cpu:0 restarted and lost this request's state (it had already run again 1x "
        "after losing an actor)")
    assert req.request_id not in host.seqs and core.book.kv_used["cpu:0"] == 0


def test_a_server_whose_engine_gives_up_stops_with_an_error(path, monkeypatch):
    from moeflow.serve.client import AsyncClient, ServerError
    from moeflow.serve.config import EngineConfig
    from moeflow.serve.server import EngineFailed, RequestServer, ServerConfig

    def complete(self: EngineCore, job: Any, result: Any) -> Any:
        raise RuntimeError("always broken")

    monkeypatch.setattr(EngineCore, "complete", complete)

    async def main() -> None:
        server = RequestServer(ServerConfig(EngineConfig(str(path)), bind="tcp://127.0.0.1:*"))
        started = asyncio.Event()
        serving = asyncio.create_task(server.serve(lambda s: started.set()))
        async with asyncio.timeout(60):
            await started.wait()
        client = AsyncClient(server.address, timeout=10)
        finals = []
        for _ in range(10):
            if serving.done():
                break
            try:
                async for reply in client.generate(prompt_ids=PROMPT, max_new_tokens=4):
                    if reply["type"] == "final":
                        finals.append(reply["finish_reason"])
            except ServerError as exc:
                finals.append(exc.code)
            except TimeoutError:  # sent as the server stopped: nobody is there to answer
                assert serving.done()
        client.close()
        with pytest.raises(EngineFailed, match="always broken"):
            async with asyncio.timeout(60):
                await serving
        assert finals and all(f.startswith("error") or f == "internal" for f in finals), finals

    asyncio.run(main())
