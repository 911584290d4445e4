"""Benchmark a running `moeflow serve`: requests at a workload's arrival times, streamed,
timed by the client, over its ZeroMQ protocol or its OpenAI-compatible HTTP front end.

    result = run_bench("tcp://127.0.0.1:5555", "poisson:rate=4", 50, "uniform:16-64",
                       "uniform:8-32", seed=0)
    result = run_bench("http://127.0.0.1:8000", "poisson:rate=4", 50, "uniform:16-64",
                       "uniform:8-32", seed=0, backend="openai", slos={"ttft": 300.0})
    print(format_summary(result["summary"]))

Each request sends random token ids (below the server's vocab_size) of the drawn prompt
length and asks for exactly the drawn output length (ignore_eos, greedy, streamed). The
metrics are those of `vllm bench serve`, named alike for both backends: TTFT (its first
token), TPOT ((last - first token) / (tokens - 1)), ITL (every gap between consecutive
tokens, pooled over the requests), end-to-end latency, and goodput (requests/s that meet
every SLO given).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from moeflow.sim.simulator import percentile
from moeflow.sim.workload import Lengths, SimRequest, requests
from moeflow.serve.client import AsyncClient, ServerError

if TYPE_CHECKING:
    import aiohttp

BACKENDS = ("zmq", "openai")
QUANTILES = (50, 90, 99)
MAX_REASONS = 5  # distinct failure messages a summary lists
SLO_METRICS = ("ttft", "tpot", "e2e")
DEFAULT_VOCAB = 1000  # prompts' id range when /health names no vocab_size


class BenchError(RuntimeError):
    """The run cannot start: nothing answers at the address, or it answers with an error."""


class RequestFailed(Exception):
    """One request failed (an error reply or status, a broken stream); the run goes on."""


@dataclass(frozen=True, slots=True)
class Finished:
    """The end of one request's stream, as the server reports it."""

    finish_reason: str | None
    completion_tokens: int


@dataclass
class Record:
    """One request of a bench run (filled in as its replies arrive)."""

    index: int
    arrival_s: float
    prompt_tokens: int
    max_new_tokens: int
    completion_tokens: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)  # the gaps between its tokens
    finish_reason: str | None = None
    error: str | None = "not finished"
    end_s: float | None = None  # since the run began


class Backend(Protocol):
    """One way to reach the server. `generate` yields each token's arrival
    (time.perf_counter()), then one Finished; it raises RequestFailed."""

    async def health(self) -> dict[str, Any]: ...

    def generate(self, prompt_ids: list[int], max_new_tokens: int
                 ) -> AsyncIterator[float | Finished]: ...


def run_bench(address: str, arrivals: str, num_requests: int, prompt_len: str | Lengths,
              output_len: str | Lengths, seed: int = 0, *, backend: str = "zmq",
              timeout: float = 600.0, progress: Callable[[int], None] | None = None,
              client_timeout: float = 60.0, slos: dict[str, float] | None = None,
              api_key: str | None = None, **client_options: Any) -> dict[str, Any]:
    """Run a workload against the server at `address` (tcp://... for `zmq`, the base URL
    for `openai`); returns {"summary", "records"}. `slos` (ms by "ttft", "tpot", "e2e")
    define goodput. `client_options` go to AsyncClient (CURVE keys)."""
    prompt = Lengths.parse(prompt_len) if isinstance(prompt_len, str) else prompt_len
    output = Lengths.parse(output_len) if isinstance(output_len, str) else output_len
    workload = requests(arrivals, num_requests, prompt, output, seed=seed)
    return asyncio.run(bench(address, workload, backend=backend, seed=seed, timeout=timeout,
                             progress=progress, client_timeout=client_timeout, label=arrivals,
                             slos=slos, api_key=api_key, **client_options))


async def bench(address: str, workload: list[SimRequest], *, backend: str = "zmq",
                seed: int = 0, timeout: float = 600.0,
                progress: Callable[[int], None] | None = None, client_timeout: float = 60.0,
                label: str = "", slos: dict[str, float] | None = None,
                api_key: str | None = None, **client_options: Any) -> dict[str, Any]:
    """The bench run itself, in a running event loop."""
    async with connect(backend, address, max(1, len(workload)), client_timeout, api_key,
                       **client_options) as server:
        health = await server.health()
        rng = random.Random(seed + 1)  # prompts: independent of the workload's draws
        vocab_size = health.get("vocab_size") or DEFAULT_VOCAB
        records = [Record(i, r.arrival, r.prompt, r.output) for i, r in enumerate(workload)]
        prompts = [[rng.randrange(vocab_size) for _ in range(r.prompt)] for r in workload]
        num_done = 0
        start = time.perf_counter()

        async def one(record: Record, prompt_ids: list[int]) -> None:
            nonlocal num_done
            await asyncio.sleep(max(0.0, start + record.arrival_s - time.perf_counter()))
            sent = time.perf_counter()
            times: list[float] = []
            try:
                async for event in server.generate(prompt_ids, record.max_new_tokens):
                    if isinstance(event, Finished):
                        record.finish_reason = event.finish_reason
                        record.completion_tokens = event.completion_tokens
                    else:
                        times.append(event)
                end = time.perf_counter()
                record.error = (None if record.finish_reason in ("length", "stop")
                                else f"finish_reason {record.finish_reason}")
                record.e2e_ms = (end - sent) * 1e3
                record.end_s = end - start
                if times:
                    record.ttft_ms = (times[0] - sent) * 1e3
                num_tokens = record.completion_tokens or len(times)
                if len(times) > 1 and num_tokens > 1:
                    record.tpot_ms = (times[-1] - times[0]) / (num_tokens - 1) * 1e3
                record.itl_ms = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
            except RequestFailed as exc:
                record.error = str(exc)
            num_done += 1
            if progress is not None:
                progress(num_done)

        try:
            async with asyncio.timeout(timeout), asyncio.TaskGroup() as tasks:
                for record, prompt_ids in zip(records, prompts):
                    tasks.create_task(one(record, prompt_ids))
        except TimeoutError:
            for record in records:
                if record.error == "not finished":
                    record.error = f"not finished within the {timeout:g} s timeout"
        elapsed = time.perf_counter() - start
    summary = summarize(records, elapsed, slos)
    summary.update(backend=backend, address=address, workload=label, model=health.get("model"),
                   scheduler=health.get("scheduler"), devices=health.get("devices"))
    return {"summary": summary, "records": [asdict(r) for r in records]}


@asynccontextmanager
async def connect(backend: str, address: str, num_connections: int, timeout: float,
                  api_key: str | None = None, **client_options: Any) -> AsyncIterator[Backend]:
    """The backend named `backend`, connected to `address` for the `async with` block."""
    if backend == "zmq":
        async with AsyncClient(address, timeout=timeout, **client_options) as client:
            yield ZmqBackend(client, address, timeout)
    elif backend == "openai":
        import aiohttp

        # sock_read bounds each wait for the next chunk, as `timeout` bounds each zmq reply
        limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=num_connections), timeout=limits,
                headers=headers) as session:
            yield OpenAIBackend(session, address, timeout)
    else:
        raise ValueError(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")


class ZmqBackend:
    """The server's own protocol (docs/protocol.md), through AsyncClient."""

    def __init__(self, client: AsyncClient, address: str, timeout: float) -> None:
        self.client, self.address, self.timeout = client, address, timeout

    async def health(self) -> dict[str, Any]:
        wait = min(self.timeout, 10.0)
        try:
            return await self.client.health(timeout=wait)
        except TimeoutError:
            raise BenchError(f"no health reply from {self.address} within {wait:g} s "
                             "(is `moeflow serve` running there?)") from None
        except ServerError as exc:
            raise BenchError(f"{self.address}: {exc}") from exc

    async def generate(self, prompt_ids: list[int], max_new_tokens: int
                       ) -> AsyncIterator[float | Finished]:
        try:
            async for reply in self.client.generate(prompt_ids=prompt_ids, ignore_eos=True,
                                                    max_new_tokens=max_new_tokens,
                                                    temperature=0.0):
                if reply["type"] == "token":
                    yield time.perf_counter()
                else:
                    yield Finished(reply["finish_reason"], reply["usage"]["completion_tokens"])
        except (ServerError, TimeoutError) as exc:
            raise RequestFailed(str(exc) or type(exc).__name__) from exc


class OpenAIBackend:
    """An OpenAI-compatible server: GET /health, streamed POST /v1/completions."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        self.session, self.timeout = session, timeout
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model: str | None = None

    async def health(self) -> dict[str, Any]:
        health: dict[str, Any] = await self._get("/health")
        models = await self._get("/v1/models", required=False)
        listed = models.get("data") if isinstance(models, dict) else None
        self.model = listed[0]["id"] if listed else health.get("model")
        return health

    async def _get(self, path: str, required: bool = True) -> Any:
        import aiohttp

        url = self.base_url + path
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(
                    total=min(self.timeout, 10.0))) as resp:
                if resp.status == 200:
                    return await resp.json(content_type=None)
                if required:
                    raise BenchError(f"GET {url}: {await _http_error(resp)}")
                return {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise BenchError(f"cannot reach {url}: {str(exc) or type(exc).__name__} "
                             "(is `moeflow serve --http` running there?)") from exc

    async def generate(self, prompt_ids: list[int], max_new_tokens: int
                       ) -> AsyncIterator[float | Finished]:
        import aiohttp

        payload = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_new_tokens,
                   "temperature": 0.0, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True}}
        num_tokens = 0
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        # a chunk with a finish_reason and no text may be a token or OpenAI's bare
        # end-of-choice chunk: usage tells which
        held: float | None = None
        try:
            async with self.session.post(self.base_url + "/v1/completions",
                                         json=payload) as resp:
                if resp.status != 200:
                    raise RequestFailed(await _http_error(resp))
                async for data in sse_data(resp.content):
                    now = time.perf_counter()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RequestFailed(f"error event: {_error_message(chunk)}")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if not chunk.get("choices"):
                        continue
                    choice = chunk["choices"][0]
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if choice.get("finish_reason") and not choice.get("text"):
                        held = now
                        continue
                    num_tokens += 1
                    yield now
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RequestFailed(f"{type(exc).__name__}: {exc}") from exc
        if held is not None and (usage is None or num_tokens < usage["completion_tokens"]):
            num_tokens += 1
            yield held
        yield Finished(finish_reason, usage["completion_tokens"] if usage else num_tokens)


async def sse_data(stream: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The data of each server-sent event on `stream` (its `data:` lines joined)."""
    lines: list[str] = []
    async for raw in stream:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    if lines:
        yield "\n".join(lines)


async def _http_error(resp: aiohttp.ClientResponse) -> str:
    text = await resp.text()
    try:
        message = _error_message(json.loads(text))
    except ValueError:
        message = text.strip()[:200]
    return f"HTTP {resp.status}: {message}"


def _error_message(body: Any) -> str:
    """The message of an OpenAI error body {"error": {"message", ...}}, else the body."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return json.dumps(body)[:200]


def parse_slos(specs: Sequence[str]) -> dict[str, float]:
    """`--goodput` values, NAME:MS with NAME one of ttft, tpot, e2e (or vLLM's e2el)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, _, value = spec.partition(":")
        name = "e2e" if name == "e2el" else name
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if name not in SLO_METRICS or not 0 < ms < math.inf:
            raise ValueError(f"--goodput {spec!r}: expected NAME:MS with NAME one of "
                             f"{', '.join(SLO_METRICS)} and MS > 0")
        slos[name] = ms
    return slos


def meets(record: Record, slos: dict[str, float]) -> bool:
    """Whether a finished request met every SLO (a single token has no TPOT to miss)."""
    tpot = record.tpot_ms if record.tpot_ms is not None else 0.0
    values = {"ttft": record.ttft_ms, "tpot": tpot, "e2e": record.e2e_ms}
    return all((value := values[name]) is not None and value <= ms
               for name, ms in slos.items())


def summarize(records: list[Record], elapsed: float,
              slos: dict[str, float] | None = None) -> dict[str, Any]:
    """Throughput and goodput over the run and latency statistics (ms) of the requests that
    finished. Each statistic has mean, median (= p50), p90 and p99."""
    good = [r for r in records if r.error is None]
    ends = [r.end_s for r in good if r.end_s is not None]
    duration = max(ends) if ends else elapsed
    output_tokens = sum(r.completion_tokens for r in good)
    num_goodput = sum(meets(r, slos) for r in good) if slos else None

    def rate(count: int) -> float:
        return count / duration if duration > 0 else 0.0

    def stats(values: list[float]) -> dict[str, float | None]:
        out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None,
                                        "median": percentile(values, 50) if values else None}
        out.update({f"p{q}": percentile(values, q) if values else None for q in QUANTILES})
        return out

    reasons: dict[str, int] = {}  # why requests failed, the commonest first
    for r in records:
        if r.error is not None:
            reasons[r.error] = reasons.get(r.error, 0) + 1
    return {"num_requests": len(records), "num_errors": len(records) - len(good),
            "errors": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:MAX_REASONS]),
            "duration_s": duration, "input_tokens": sum(r.prompt_tokens for r in good),
            "output_tokens": output_tokens, "output_tokens_per_s": rate(output_tokens),
            "requests_per_s": rate(len(good)),
            "slo_ms": dict(slos or {}), "num_goodput_requests": num_goodput,
            "goodput_requests_per_s": rate(num_goodput) if num_goodput is not None else None,
            "ttft_ms": stats([r.ttft_ms for r in good if r.ttft_ms is not None]),
            "tpot_ms": stats([r.tpot_ms for r in good if r.tpot_ms is not None]),
            "itl_ms": stats([gap for r in good for gap in r.itl_ms]),
            "e2e_ms": stats([r.e2e_ms for r in good if r.e2e_ms is not None])}


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a short table."""
    head = (f"{summary['num_requests']} requests to {summary.get('address', '?')} "
            f"({summary.get('workload', '')}) in {summary['duration_s']:.2f} s, "
            f"{summary['num_errors']} errors")
    lines = [head,
             f"throughput: {summary['output_tokens_per_s']:.1f} output tok/s, "
             f"{summary['requests_per_s']:.2f} req/s"]
    if summary.get("goodput_requests_per_s") is not None:
        slos = ", ".join(f"{name} <= {ms:g} ms" for name, ms in summary["slo_ms"].items())
        lines.append(f"goodput: {summary['goodput_requests_per_s']:.2f} req/s "
                     f"({summary['num_goodput_requests']} of {summary['num_requests']} "
                     f"requests meet {slos})")
    for reason, count in summary.get("errors", {}).items():
        lines.append(f"error x{count}: {reason}")
    columns = ("mean", *(f"p{q}" for q in QUANTILES))
    lines.append(f"{'':10}" + "".join(f"{c:>10}" for c in columns))
    for name in ("ttft", "tpot", "itl", "e2e"):
        row = summary[f"{name}_ms"]
        cells = "".join(f"{row[c]:>10.1f}" if row.get(c) is not None else f"{'-':>10}"
                        for c in columns)
        lines.append(f"{name + ' ms':10}{cells}")
    return "\n".join(lines)
