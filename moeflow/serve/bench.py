"""Benchmark a running `moeflow serve`: requests at a workload's arrival times, streamed,
timed by the client.

    result = run_bench("tcp://127.0.0.1:5555", "poisson:rate=4", 50, "uniform:16-64",
                       "uniform:8-32", seed=0)
    print(format_summary(result["summary"]))

Each request sends random token ids (below the server's vocab_size) of the drawn prompt
length, asks for exactly the drawn output length (ignore_eos), and records TTFT (its first
token reply), TPOT (the mean gap between later tokens) and end-to-end latency.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from moeflow.sim.simulator import percentile
from moeflow.sim.workload import Lengths, SimRequest, requests
from moeflow.serve.client import AsyncClient, ServerError

QUANTILES = (50, 90, 99)


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
    finish_reason: str | None = None
    error: str | None = "not finished"
    end_s: float | None = None  # since the run began


def run_bench(address: str, arrivals: str, num_requests: int, prompt_len: str | Lengths,
              output_len: str | Lengths, seed: int = 0, *, timeout: float = 600.0,
              progress: Callable[[int], None] | None = None, client_timeout: float = 60.0,
              **client_options: Any) -> dict[str, Any]:
    """Run a workload against the server at `address`; returns {"summary", "records"}.
    `client_options` go to AsyncClient (CURVE keys)."""
    prompt = Lengths.parse(prompt_len) if isinstance(prompt_len, str) else prompt_len
    output = Lengths.parse(output_len) if isinstance(output_len, str) else output_len
    workload = requests(arrivals, num_requests, prompt, output, seed=seed)
    return asyncio.run(bench(address, workload, seed=seed, timeout=timeout, progress=progress,
                             client_timeout=client_timeout, label=arrivals, **client_options))


async def bench(address: str, workload: list[SimRequest], *, seed: int = 0,
                timeout: float = 600.0, progress: Callable[[int], None] | None = None,
                client_timeout: float = 60.0, label: str = "",
                **client_options: Any) -> dict[str, Any]:
    """The bench run itself, in a running event loop."""
    async with AsyncClient(address, timeout=client_timeout, **client_options) as client:
        health = await client.health(timeout=min(client_timeout, 10.0))
        rng = random.Random(seed + 1)  # prompts: independent of the workload's draws
        records = [Record(i, r.arrival, r.prompt, r.output) for i, r in enumerate(workload)]
        prompts = [[rng.randrange(health["vocab_size"]) for _ in range(r.prompt)]
                   for r in workload]
        num_done = 0
        start = time.perf_counter()

        async def one(record: Record, prompt_ids: list[int]) -> None:
            nonlocal num_done
            await asyncio.sleep(max(0.0, start + record.arrival_s - time.perf_counter()))
            sent = time.perf_counter()
            times: list[float] = []
            try:
                async for reply in client.generate(prompt_ids=prompt_ids, ignore_eos=True,
                                                   max_new_tokens=record.max_new_tokens):
                    if reply["type"] == "token":
                        times.append(time.perf_counter())
                    else:
                        record.finish_reason = reply["finish_reason"]
                        record.completion_tokens = reply["usage"]["completion_tokens"]
                end = time.perf_counter()
                record.error = (None if record.finish_reason in ("length", "stop")
                                else f"finish_reason {record.finish_reason}")
                record.e2e_ms = (end - sent) * 1e3
                record.end_s = end - start
                if times:
                    record.ttft_ms = (times[0] - sent) * 1e3
                if len(times) > 1:
                    record.tpot_ms = (times[-1] - times[0]) / (len(times) - 1) * 1e3
            except (ServerError, TimeoutError) as exc:
                record.error = str(exc) or type(exc).__name__
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
    summary = summarize(records, elapsed)
    summary.update(address=address, workload=label, model=health.get("model"),
                   scheduler=health.get("scheduler"), devices=health.get("devices"))
    return {"summary": summary, "records": [asdict(r) for r in records]}


def summarize(records: list[Record], elapsed: float) -> dict[str, Any]:
    """Throughput over the run and latency quantiles (ms) of the requests that finished."""
    good = [r for r in records if r.error is None]
    ends = [r.end_s for r in good if r.end_s is not None]
    duration = max(ends) if ends else elapsed
    output_tokens = sum(r.completion_tokens for r in good)

    def stats(values: list[float]) -> dict[str, float | None]:
        out: dict[str, float | None] = {f"p{q}": percentile(values, q) if values else None
                                        for q in QUANTILES}
        out["mean"] = sum(values) / len(values) if values else None
        return out

    return {"num_requests": len(records), "num_errors": len(records) - len(good),
            "duration_s": duration, "output_tokens": output_tokens,
            "output_tokens_per_s": output_tokens / duration if duration > 0 else 0.0,
            "requests_per_s": len(good) / duration if duration > 0 else 0.0,
            "ttft_ms": stats([r.ttft_ms for r in good if r.ttft_ms is not None]),
            "tpot_ms": stats([r.tpot_ms for r in good if r.tpot_ms is not None]),
            "e2e_ms": stats([r.e2e_ms for r in good if r.e2e_ms is not None])}


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a short table."""
    head = (f"{summary['num_requests']} requests to {summary.get('address', '?')} "
            f"({summary.get('workload', '')}) in {summary['duration_s']:.2f} s, "
            f"{summary['num_errors']} errors")
    lines = [head,
             f"throughput: {summary['output_tokens_per_s']:.1f} output tok/s, "
             f"{summary['requests_per_s']:.2f} req/s",
             f"{'':10}" + "".join(f"{f'p{q}':>10}" for q in QUANTILES)]
    for name in ("ttft", "tpot", "e2e"):
        row = summary[f"{name}_ms"]
        cells = "".join(f"{row[f'p{q}']:>10.1f}" if row[f"p{q}"] is not None else f"{'-':>10}"
                        for q in QUANTILES)
        lines.append(f"{name + ' ms':10}{cells}")
    return "\n".join(lines)
