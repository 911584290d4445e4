"""`moeflow bench --backend openai` against a fake OpenAI-compatible server (aiohttp.web on
127.0.0.1, streaming known chunks), and summarize() on hand-made records."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from moeflow import cli  # noqa: E402
from moeflow.serve.bench import (BenchError, Record, format_summary, parse_slos,  # noqa: E402
                                 run_bench, summarize)

TOO_MANY = 13  # a prompt of this many tokens gets HTTP 429
BAD = 14  # ... and this many HTTP 400
BROKEN = 15  # ... and this many a stream cut off before its finish_reason


class FakeOpenAI:
    """Streams `max_tokens` chunks `delay_s` apart, one token each (every third with no
    text, as mid-character), the last with finish_reason "length"; then the usage chunk
    and [DONE]. With `bare_finish` the finish_reason comes in a chunk of its own, without
    text (as OpenAI sends it). Keeps every request body and Authorization header."""

    def __init__(self, *, delay_s: float = 0.005, health: dict[str, Any] | None = None,
                 bare_finish: bool = False) -> None:
        self.delay_s, self.bare_finish = delay_s, bare_finish
        self.health = health if health is not None else {
            "status": "ok", "model": "fake", "vocab_size": 50, "max_position_embeddings": 128,
            "scheduler": "batch-ep", "devices": ["cpu:0"]}
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(self.health)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.authorizations.append(request.headers.get("Authorization"))
        num_prompt = len(body["prompt"])
        if num_prompt in (TOO_MANY, BAD):
            status, kind = (429, "overloaded") if num_prompt == TOO_MANY else (400, "invalid")
            return web.json_response({"error": {"message": f"{kind} request", "type": kind,
                                                "param": None, "code": status}}, status=status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": a comment line, ignored\n\n")
        num_tokens = body["max_tokens"]
        for i in range(num_tokens):
            await asyncio.sleep(self.delay_s)
            if num_prompt == BROKEN and i == 1:
                return resp  # the connection closes without a finish_reason
            last = i == num_tokens - 1 and not self.bare_finish
            choice = {"index": 0, "text": "" if i % 3 == 1 else f"t{i}",
                      "finish_reason": "length" if last else None}
            await resp.write(self._event({"choices": [choice]}))
        if self.bare_finish:
            await resp.write(self._event({"choices": [{"index": 0, "text": "",
                                                       "finish_reason": "length"}]}))
        usage = {"prompt_tokens": num_prompt, "completion_tokens": num_tokens,
                 "total_tokens": num_prompt + num_tokens}
        await resp.write(self._event({"choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    @staticmethod
    def _event(chunk: dict[str, Any]) -> bytes:
        chunk = {"id": "cmpl-1", "object": "text_completion", "model": "fake-model", **chunk}
        return f"data: {json.dumps(chunk)}\n\n".encode()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


def trace(tmp_path: Any, rows: list[tuple[float, int, int]]) -> str:
    """A trace workload: (arrival s, prompt tokens, output tokens) per request."""
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"arrival": a, "prompt": p, "output": o}) + "\n"
                            for a, p, o in rows))
    return f"trace:{path}"


def test_records_and_summary_of_a_streamed_run(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    rows = [(0.0, 4, 5), (0.01, 7, 1), (0.02, 3, 8), (0.05, 9, 3)]
    result = run_bench(fake.url, trace(tmp_path, rows), len(rows), "fixed:1", "fixed:1",
                       backend="openai", slos={"e2e": 60_000.0})
    records, summary = result["records"], result["summary"]
    assert [r["error"] for r in records] == [None] * 4
    assert [r["completion_tokens"] for r in records] == [5, 1, 8, 3]
    assert [r["finish_reason"] for r in records] == ["length"] * 4
    assert [len(r["itl_ms"]) for r in records] == [4, 0, 7, 2]  # n - 1 gaps each
    for r in records:
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert all(gap >= 0 for gap in r["itl_ms"])
        assert (r["tpot_ms"] is None) == (r["completion_tokens"] == 1)
    # what the requests asked for
    assert sorted(len(b["prompt"]) for b in fake.bodies) == [3, 4, 7, 9]
    for body in fake.bodies:
        assert all(0 <= t < 50 for t in body["prompt"])  # below /health's vocab_size
        assert body["model"] == "fake-model"  # the id /v1/models lists
        assert (body["stream"], body["ignore_eos"], body["temperature"]) == (True, True, 0)
        assert body["stream_options"] == {"include_usage": True}
    assert sorted(b["max_tokens"] for b in fake.bodies) == [1, 3, 5, 8]
    assert fake.authorizations == ["Bearer sk-test"] * 4

    assert summary["backend"] == "openai" and summary["model"] == "fake"
    assert summary["num_requests"] == 4 and summary["num_errors"] == 0
    assert summary["output_tokens"] == 17 and summary["input_tokens"] == 23
    assert summary["output_tokens_per_s"] == pytest.approx(17 / summary["duration_s"])
    assert summary["requests_per_s"] == pytest.approx(4 / summary["duration_s"])
    assert summary["num_goodput_requests"] == 4
    assert summary["goodput_requests_per_s"] == pytest.approx(summary["requests_per_s"])
    for name in ("ttft", "tpot", "itl", "e2e"):
        stats = summary[f"{name}_ms"]
        assert stats["median"] == stats["p50"]
        assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"]
    assert summary["ttft_ms"]["p99"] <= summary["e2e_ms"]["p99"]
    text = format_summary(summary)
    assert "itl ms" in text and "goodput: " in text and "4 of 4 requests meet e2e" in text


def test_a_bare_finish_chunk_is_no_token():
    server = FakeOpenAI(bare_finish=True).start()
    try:
        result = run_bench(server.url, "burst", 3, "fixed:5", "fixed:4", backend="openai")
    finally:
        server.stop()
    assert [r["completion_tokens"] for r in result["records"]] == [4, 4, 4]
    assert [len(r["itl_ms"]) for r in result["records"]] == [3, 3, 3]
    assert result["summary"]["num_errors"] == 0


def test_error_responses_fail_their_request_and_the_run_goes_on(fake, tmp_path):
    rows = [(0.0, 5, 3), (0.0, TOO_MANY, 3), (0.0, BAD, 3), (0.0, BROKEN, 3), (0.01, 6, 2)]
    result = run_bench(fake.url, trace(tmp_path, rows), len(rows), "fixed:1", "fixed:1",
                       backend="openai")
    records, summary = result["records"], result["summary"]
    assert records[0]["error"] is None and records[4]["error"] is None
    assert records[1]["error"] == "HTTP 429: overloaded request"
    assert records[2]["error"] == "HTTP 400: invalid request"
    assert records[3]["error"] == "finish_reason None"
    assert summary["num_errors"] == 3 and summary["output_tokens"] == 5
    assert summary["itl_ms"]["mean"] is not None  # from the two that finished


def test_health_without_vocab_size_falls_back_to_1000():
    server = FakeOpenAI(health={"status": "ok"}).start()
    try:
        result = run_bench(server.url + "/v1/", "burst", 2, "fixed:200", "fixed:2",
                           backend="openai", seed=3)
    finally:
        server.stop()
    assert result["summary"]["num_errors"] == 0
    ids = [t for body in server.bodies for t in body["prompt"]]
    assert max(ids) < 1000 and max(ids) >= 50  # not below the default fake's vocab_size


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_server_that_is_down_is_a_clear_error(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(BenchError, match=r"cannot reach .*/health.*moeflow serve --http"):
        run_bench(url, "burst", 2, "fixed:4", "fixed:2", backend="openai", client_timeout=5)
    assert cli.main(["bench", "--backend", "openai", "--base-url", url, "--num-requests", "2",
                     "--workload", "burst"]) == 1
    assert "moeflow bench: error: cannot reach" in capsys.readouterr().err


def test_the_command_line(fake, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--backend", "openai", "--base-url", fake.url,
                     "--api-key", "sk-flag", "--workload", "poisson:rate=200",
                     "--num-requests", "5", "--prompt-len", "uniform:2-6",
                     "--output-len", "uniform:2-5", "--goodput", "ttft:60000", "tpot:60000",
                     "--json", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    for row in ("ttft ms", "tpot ms", "itl ms", "e2e ms", "p50", "p99", "0 errors",
                "goodput: ", "5 of 5 requests meet ttft <= 60000 ms, tpot <= 60000 ms"):
        assert row in stdout, stdout
    result = json.loads(out.read_text())
    assert result["summary"]["address"] == fake.url
    assert result["summary"]["output_tokens"] == sum(r["max_new_tokens"]
                                                     for r in result["records"])
    assert set(fake.authorizations) == {"Bearer sk-flag"}


def test_a_bad_goodput_flag_exits_2(capsys):
    assert cli.main(["bench", "--goodput", "ttfb:300"]) == 2
    assert "--goodput 'ttfb:300'" in capsys.readouterr().err


def test_parse_slos():
    assert parse_slos(["ttft:300", "tpot:50.5", "e2el:2000"]) == {
        "ttft": 300.0, "tpot": 50.5, "e2e": 2000.0}
    for bad in ("ttft", "ttft:", "ttft:-1", "ttft:nan", "ttft:inf", "itl:5"):
        with pytest.raises(ValueError, match="NAME:MS"):
            parse_slos([bad])


def record(index: int, times_ms: list[float], *, sent_ms: float = 0.0,
           error: str | None = None) -> Record:
    """A finished request whose tokens arrived at `times_ms` (its end: the last one)."""
    r = Record(index, 0.0, prompt_tokens=10, max_new_tokens=len(times_ms),
               completion_tokens=len(times_ms), error=error)
    r.ttft_ms = times_ms[0] - sent_ms
    r.e2e_ms = times_ms[-1] - sent_ms
    r.end_s = times_ms[-1] / 1e3
    r.itl_ms = [b - a for a, b in zip(times_ms, times_ms[1:])]
    if len(times_ms) > 1:
        r.tpot_ms = (times_ms[-1] - times_ms[0]) / (len(times_ms) - 1)
    return r


def test_summarize_pools_itl_and_counts_goodput():
    records = [record(0, [100.0, 110.0, 130.0, 160.0]),  # ttft 100, tpot 20, e2e 160
               record(1, [50.0, 90.0]),                   # ttft 50, tpot 40, e2e 90
               record(2, [400.0]),                        # ttft 400, no tpot, e2e 400
               record(3, [10.0, 20.0], error="HTTP 429: overloaded")]
    summary = summarize(records, elapsed=1.0, slos={"ttft": 200.0, "tpot": 30.0})
    assert summary["num_requests"] == 4 and summary["num_errors"] == 1
    assert summary["duration_s"] == pytest.approx(0.4)  # the last good request's end
    assert summary["output_tokens"] == 7 and summary["input_tokens"] == 30
    assert summary["output_tokens_per_s"] == pytest.approx(7 / 0.4)
    assert summary["requests_per_s"] == pytest.approx(3 / 0.4)
    itl = summary["itl_ms"]  # gaps 10, 20, 30 and 40, pooled; not the failed request's
    assert itl["mean"] == pytest.approx(25.0) and itl["median"] == pytest.approx(25.0)
    assert itl["p99"] == pytest.approx(30 + 10 * 0.97)
    assert summary["tpot_ms"]["mean"] == pytest.approx(30.0)
    assert summary["tpot_ms"]["median"] == pytest.approx(30.0)
    assert summary["ttft_ms"]["median"] == pytest.approx(100.0)
    assert summary["e2e_ms"]["mean"] == pytest.approx(650 / 3)
    # goodput: request 0 meets both SLOs; 1 misses tpot; 2 misses ttft
    assert summary["num_goodput_requests"] == 1
    assert summary["goodput_requests_per_s"] == pytest.approx(1 / 0.4)
    assert summarize(records, 1.0, {"tpot": 30.0})["num_goodput_requests"] == 2  # 0 and 2
    assert summarize(records, 1.0, {"e2e": 100.0})["num_goodput_requests"] == 1  # only 1
    no_slos = summarize(records, 1.0)
    assert no_slos["goodput_requests_per_s"] is None and "goodput" not in format_summary(no_slos)


def test_summarize_with_no_finished_request():
    summary = summarize([record(0, [10.0], error="HTTP 400: bad")], elapsed=2.0,
                        slos={"ttft": 1.0})
    assert summary["duration_s"] == 2.0 and summary["requests_per_s"] == 0.0
    assert summary["itl_ms"] == {"mean": None, "median": None, "p50": None, "p90": None,
                                 "p99": None}
    assert summary["goodput_requests_per_s"] == 0.0
    assert "-" in format_summary(summary)
