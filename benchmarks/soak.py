"""Soak: `moeflow serve` under Poisson load for minutes, with an actor faulted every 30 s.

    python benchmarks/soak.py [--minutes 10] [--rate 3] [--fault-every 30] [--json out.json]
                              [--model DIR] [--scheduler fine-ep] [--transport zmq] [--http]

With `--http` the requests go through the OpenAI-compatible front end instead of ZeroMQ:
half of them streamed, and one in five of the streams closed by the client after its
second chunk (the server must abort it and free its KV cache; nothing is expected of it).

The server runs with two actor processes (`--transport zmq --devices cpu:0,cpu:1`), or
with both actors inside it (`--transport inproc`: no faults, the server's memory alone). Every
`--fault-every` seconds actor cpu:1 is either killed (SIGKILL) or stopped (SIGSTOP, then
SIGCONT once the server has noticed): cpu:0 and the server itself live through the whole
run, so their memory can be followed from start to end. Every request is greedy over one
of a few fixed prompts, so its tokens are checked against the same prompt's answer taken
before any fault.

Reported: requests sent, completed with the right tokens, completed with wrong tokens
(must be 0), failed with a clear error, lost (no final and no error within the request
timeout: must be 0); faults injected; RSS of the server and of each actor that lived
through the run (cpu:0; both without faults) at minute 2 and at the end, and their growth
(goal: < 5 %). Progress goes to stderr once a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import Server, real_checkpoint  # noqa: E402

# the serving benchmark's shape in fp32: bf16 logits depend on how requests are batched, so
# a greedy token could differ from the answer taken alone without anything having failed
SOAK_CHECKPOINT = Path(".cache/soak-qwen3-moe")


ACTORS = ("cpu:0", "cpu:1")  # the server's devices; cpu:1 is the one faulted
PROMPTS = [[5, 17, 33, 2, 99, 4], [250, 7, 8], [8, 9, 10, 11, 300, 301, 302, 40], [61, 62]]
MAX_NEW_TOKENS = 16
REQUEST_TIMEOUT_S = 60.0


def soak_checkpoint() -> Path:
    return real_checkpoint(SOAK_CHECKPOINT, "float32")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(c) for c in text)
    return out


def actor_pids(server_pid: int) -> dict[str, int]:
    """Actor processes by device name, read from their command lines."""
    found = {}
    for pid in children(server_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parts = cmd.split()
        if "moeflow.actors.process" in parts and parts[-1] in ACTORS:
            found[parts[-1]] = pid
    return found


async def one(client: Any, prompt: list[int], expected: tuple[int, ...] | None,
              stats: dict[str, int]) -> tuple[int, ...] | None:
    from moeflow.serve.client import ServerError

    stats["sent"] += 1
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async for reply in client.generate(prompt_ids=prompt, max_new_tokens=MAX_NEW_TOKENS,
                                               ignore_eos=True, stream=False):
                if reply["type"] == "final":
                    tokens = tuple(reply["token_ids"])
                    if reply["finish_reason"].startswith("error"):
                        stats["failed_cleanly"] += 1
                    elif expected is None or tokens == expected:
                        stats["completed_correctly"] += 1
                    else:
                        stats["wrong_tokens"] += 1
                    return tokens
    except ServerError:
        stats["failed_cleanly"] += 1
        return None
    except TimeoutError:
        stats["lost"] += 1
        return None
    stats["lost"] += 1
    return None


class HttpClient:
    """The soak's requests over HTTP (aiohttp), with `one`'s accounting."""

    def __init__(self, base_url: str, rng: random.Random) -> None:
        import aiohttp

        self.base_url, self.rng = base_url, rng
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            connector=aiohttp.TCPConnector(limit=0))
        self.model = ""

    async def one(self, prompt: list[int], expected: tuple[int, ...] | None,
                  stats: dict[str, int]) -> tuple[int, ...] | None:
        import aiohttp

        if not self.model:
            async with self.session.get(self.base_url + "/v1/models") as reply:
                self.model = (await reply.json())["data"][0]["id"]
        stream = expected is not None and self.rng.random() < 0.5
        leave = stream and self.rng.random() < 0.2
        body = {"model": self.model, "prompt": prompt, "max_tokens": MAX_NEW_TOKENS,
                "temperature": 0, "ignore_eos": True, "stream": stream,
                "return_token_ids": True}
        stats["sent"] += 1
        tokens: list[int] = []
        reason = None
        try:
            async with self.session.post(self.base_url + "/v1/completions",
                                         json=body) as reply:
                if reply.status != 200:
                    stats["failed_cleanly"] += 1
                    return None
                if not stream:
                    choice = (await reply.json())["choices"][0]
                    tokens, reason = choice["token_ids"], choice["finish_reason"]
                else:
                    async for line in reply.content:
                        if not line.startswith(b"data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            stats["failed_cleanly"] += 1
                            return None
                        tokens += chunk["choices"][0]["token_ids"]
                        reason = chunk["choices"][0]["finish_reason"] or reason
                        if leave and len(tokens) == 2:
                            stats["left_by_client"] += 1
                            return None  # leaving the block closes the connection
        except (aiohttp.ClientError, TimeoutError):
            stats["lost"] += 1
            return None
        if reason is None:
            stats["lost"] += 1
            return None
        if expected is None or tuple(tokens) == expected:
            stats["completed_correctly"] += 1
        else:
            stats["wrong_tokens"] += 1
        return tuple(tokens)

    async def close(self) -> None:
        await self.session.close()


async def soak(address: str, server_pid: int, minutes: float, rate: float, fault_every: float,
               seed: int, base_url: str = "") -> dict[str, Any]:
    """`fault_every` 0: no faults. `base_url`: requests over HTTP there, not ZeroMQ."""
    from moeflow.serve.client import AsyncClient

    rng = random.Random(seed)
    stats = {"sent": 0, "completed_correctly": 0, "wrong_tokens": 0, "failed_cleanly": 0,
             "lost": 0, "faults": 0, "left_by_client": 0}
    memory: list[dict[str, Any]] = []
    http = HttpClient(base_url, random.Random(seed + 1)) if base_url else None
    client = AsyncClient(address, timeout=REQUEST_TIMEOUT_S)

    def request(prompt: list[int], expected: tuple[int, ...] | None,
                counts: dict[str, int]) -> Any:
        return (http.one(prompt, expected, counts) if http is not None
                else one(client, prompt, expected, counts))

    warmup = {"sent": 0, "completed_correctly": 0, "wrong_tokens": 0, "failed_cleanly": 0,
              "lost": 0, "left_by_client": 0}
    expected = [await request(p, None, warmup) for p in PROMPTS]
    if any(e is None for e in expected):
        raise RuntimeError(f"the warm-up requests failed: {warmup}")
    start = time.monotonic()
    end = start + minutes * 60
    next_fault = start + fault_every if fault_every else float("inf")
    next_sample = start
    pending: set[asyncio.Task[Any]] = set()
    async with asyncio.TaskGroup() as tasks:
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                sample: dict[str, Any] = {"t_s": now - start, "server_mb": rss_mb(server_pid)}
                for device, pid in actor_pids(server_pid).items():
                    sample[f"{device}_pid"], sample[f"{device}_mb"] = pid, rss_mb(pid)
                memory.append(sample)
                if int(now - start) // 60 != int(next_sample - 10 - start) // 60:
                    print(f"# {(now - start) / 60:.1f} min: {stats}, server "
                          f"{sample['server_mb']:.0f} MB" + "".join(
                              f", {d} {sample[f'{d}_mb']:.0f} MB" for d in ACTORS
                              if sample.get(f"{d}_mb")), file=sys.stderr)
                next_sample = now + 10
            if now >= next_fault:
                victim = actor_pids(server_pid).get("cpu:1")
                if victim is not None:
                    stats["faults"] += 1
                    if stats["faults"] % 2:
                        os.kill(victim, signal.SIGKILL)
                    else:
                        os.kill(victim, signal.SIGSTOP)
                        tasks.create_task(_resume_later(victim, 8.0))
                next_fault = now + fault_every
            i = rng.randrange(len(PROMPTS))
            task = tasks.create_task(request(PROMPTS[i], expected[i], stats))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(rng.expovariate(rate))
    client.close()
    if http is not None:
        await http.close()
    return {"stats": stats, "memory": memory}


async def _resume_later(pid: int, delay: float) -> None:
    await asyncio.sleep(delay)
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # already killed and replaced by the server


def growth(memory: list[dict[str, Any]], key: str, from_s: float) -> dict[str, Any]:
    """RSS of `key` ("server" or an actor's device) from `from_s` to the end."""
    rows = [m for m in memory if m.get(f"{key}_mb") is not None]
    if not rows:
        return {"error": f"{key} was never seen"}
    if key != "server":  # one process throughout, or the figure means nothing
        pids = {m[f"{key}_pid"] for m in rows}
        if len(pids) != 1:
            return {"error": f"{key} was restarted ({len(pids)} processes)"}
    key = f"{key}_mb"
    later = [m for m in rows if m["t_s"] >= from_s] or rows[-1:]
    first, last = later[0][key], rows[-1][key]
    return {"at_start_mb": round(first, 1), "at_end_mb": round(last, 1),
            "peak_mb": round(max(m[key] for m in later), 1),
            "growth_pct": round(100 * (last - first) / first, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument("--fault-every", type=float, default=30.0)
    parser.add_argument("--scheduler", default="fine-ep")
    parser.add_argument("--transport", default="zmq", choices=("zmq", "inproc"))
    parser.add_argument("--model", type=Path, help="a checkpoint (default: the serving "
                                                   "benchmark's shape in fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--http", action="store_true",
                        help="requests through the OpenAI-compatible front end")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from moeflow.cli import check_output

    check_output(parser, args.json, "--json")  # before minutes of measuring
    model = args.model or soak_checkpoint()
    fault_every = args.fault_every if args.transport == "zmq" else 0.0  # no actor to fault
    with Server(model, args.scheduler, ",".join(ACTORS), args.transport,
                http=args.http) as server:
        result = asyncio.run(soak(server.address, server.proc.pid, args.minutes, args.rate,
                                  fault_every, args.seed, server.base_url))
    from_s = min(120.0, args.minutes * 60 / 5)
    memories = {"server": growth(result["memory"], "server", from_s)}
    if args.transport == "zmq":  # each actor that lived through the run: not a faulted one
        for device in ACTORS[:1] if fault_every else ACTORS:
            memories[f"actor {device}"] = growth(result["memory"], device, from_s)
    result["memory_growth"] = memories
    stats = result["stats"]
    faults = (f"{stats['faults']} faults (actor cpu:1 killed or stopped every "
              f"{args.fault_every:g} s)" if fault_every else "no faults")
    print(f"soak: {args.minutes:g} min at {args.rate:g} req/s, {args.scheduler}, "
          f"{args.transport}, {'HTTP' if args.http else 'ZeroMQ'}, {faults}")
    print("| requests | completed correctly | wrong tokens | failed cleanly | lost | "
          "left by the client |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {stats['sent']} | {stats['completed_correctly']} | {stats['wrong_tokens']} | "
          f"{stats['failed_cleanly']} | {stats['lost']} | {stats['left_by_client']} |")
    print(f"memory from {from_s:g} s to the end: "
          + ", ".join(f"{name} {m}" for name, m in memories.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    ok = (stats["lost"] == 0 and stats["wrong_tokens"] == 0
          and all(m.get("growth_pct", 100) < 5 for m in memories.values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
