"""`moeflow serve` end to end: a server in a subprocess on a loopback port, driven by a
client written from docs/protocol.md alone (serve_harness.RawClient: raw pyzmq DEALER +
msgpack), then by moeflow.Client / AsyncClient and `moeflow bench`. Every server is stopped
with SIGTERM in teardown and must exit 0 (its engine stopped)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.auth
from serve_harness import RawClient, Server, wait_idle


@pytest.fixture(scope="module")
def model(tiny_factory) -> Path:
    return tiny_factory("qwen3_moe")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory) -> Iterator[Server]:
    # the configuration the docs lead with: fine-ep over two actor processes
    srv = Server(model, tmp_path_factory.mktemp("serve") / "server.log", "--metrics-port", "0",
                 "--scheduler", "fine-ep", "--devices", "cpu:0,cpu:1", "--transport", "zmq")
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()
        assert "shutting down" in srv.log.read_text()


@pytest.fixture
def client(server) -> Iterator[RawClient]:
    c = RawClient(server.address)
    yield c
    c.close()


@pytest.mark.timeout(180)
def test_streaming_tokens_in_order_then_a_final_equal_to_the_llm(server, client, model):
    from moeflow import LLM, SamplingParams

    prompt = [5, 17, 33, 2, 99, 250, 7]
    replies = client.generate("s1", prompt_ids=prompt, max_new_tokens=12, ignore_eos=True)
    tokens, final = replies[:-1], replies[-1]
    assert [r["type"] for r in tokens] == ["token"] * 12 and final["type"] == "final"
    assert [r["index"] for r in tokens] == list(range(12))
    assert final["finish_reason"] == "length"
    assert final["token_ids"] == [r["token_id"] for r in tokens]
    assert "".join(r["text"] for r in tokens) == final["text"]
    assert final["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12}
    assert set(final["timings"]) == {"ttft_s", "tpot_s", "e2e_s"}
    assert 0 <= final["timings"]["ttft_s"] <= final["timings"]["e2e_s"]
    with LLM(model) as llm:
        expected = llm.generate(prompt, sampling=SamplingParams(max_new_tokens=12,
                                                                ignore_eos=True))[0]
    assert tuple(final["token_ids"]) == expected.token_ids

    # a text prompt without streaming: only the final
    [final] = client.generate(42, prompt="Once upon a time", max_new_tokens=5,
                              ignore_eos=True, stream=False)
    assert final["type"] == "final" and len(final["token_ids"]) == 5

    # REQ-style framing: the empty delimiter frame is echoed on every reply
    client.socket.send_multipart([b"", msgpack.packb({"type": "health"})])
    assert client.socket.poll(30_000)
    frames = client.socket.recv_multipart()
    assert frames[0] == b"" and msgpack.unpackb(frames[1])["status"] == "ok"


@pytest.mark.timeout(120)
def test_abort_sends_the_final_then_aborted_and_frees_the_slot(client):
    client.send({"type": "generate", "id": "long", "prompt_ids": [1, 2], "max_new_tokens": 2000,
                 "ignore_eos": True})
    first = client.next_for("long")
    assert first["type"] == "token" and first["index"] == 0
    client.send({"type": "abort", "id": "long"})
    replies = [first]
    while replies[-1]["type"] == "token":
        replies.append(client.next_for("long"))
    final = replies[-1]
    assert final["type"] == "final" and final["finish_reason"] == "abort"
    assert final["token_ids"] == [r["token_id"] for r in replies[:-1]]
    assert [r["index"] for r in replies[:-1]] == list(range(len(replies) - 1))
    assert final["usage"]["completion_tokens"] == len(replies) - 1 < 2000
    assert client.next_for("long") == {"type": "aborted", "id": "long"}
    health = wait_idle(client)
    assert (health["status"], health["running"], health["waiting"]) == ("ok", 0, 0)
    again = client.ask({"type": "abort", "id": "long"})
    assert (again["type"], again["code"]) == ("error", "not_found")
    # an abort right behind its generate, while the engine is still admitting it
    client.send({"type": "generate", "id": "quick", "prompt_ids": [3], "max_new_tokens": 2000,
                 "ignore_eos": True})
    client.send({"type": "abort", "id": "quick"})
    assert client.next_for("quick", ("final",))["finish_reason"] == "abort"
    assert client.next_for("quick", ("aborted",))
    assert wait_idle(client)["running"] == 0
    # the id is free again
    assert client.generate("long", prompt_ids=[1, 2], max_new_tokens=2)[-1]["type"] == "final"


@pytest.mark.timeout(120)
def test_each_bad_request_gets_its_error_and_the_server_goes_on(client):
    def error_of(frames: list[bytes]) -> dict[str, Any]:
        client.socket.send_multipart(frames)
        reply = client.recv()
        assert reply["type"] == "error", reply
        return reply

    gen = {"type": "generate", "id": 1, "prompt_ids": [1, 2, 3]}
    cases: list[tuple[Any, str, Any, str]] = [
        # (frames or message, code, id in the reply, text in the message)
        ([b"\xc1\x00"], "malformed", None, "msgpack"),
        ([msgpack.packb([1, 2, 3])], "malformed", None, "map"),
        ([b"x", msgpack.packb({"type": "health"})], "malformed", None, "frame"),
        ([b"\x81\xa4type" + b"\x91" * 5000 + b"\xc0"], "malformed", None, "deep"),
        ({**gen, "prompt_ids": nested(32)}, "malformed", None, "32 deep"),  # 33 with the map
        ({**gen, "prompt_ids": nested(31)}, "invalid_request", 1, "prompt_ids"),
        ({"type": "teleport", "id": 2}, "unknown_type", 2, "teleport"),
        ({"type": {"a": 1}, "id": 2}, "unknown_type", 2, "{'a': 1}"),
        ({"type": ["generate"]}, "unknown_type", None, "['generate']"),
        ({**gen, "colour": "red"}, "invalid_request", 1, "colour"),
        ({**gen, "max_new_tokens": "5"}, "invalid_request", 1, "max_new_tokens"),
        ({**gen, "top_k": True}, "invalid_request", 1, "top_k"),
        ({"type": "generate", "prompt": "hi"}, "invalid_request", None, "id"),
        ({**gen, "prompt_ids": [1] * 2048}, "prompt_too_long", 1, "2047"),
        ({**gen, "prompt_ids": [300] * 30000}, "prompt_too_long", 1, "30000"),  # 90 kB frame
        ({"type": "generate", "id": 1, "prompt": "hello " * 3000}, "prompt_too_long", 1, "2047"),
        # over the default byte limit (16 per prompt token) before tokenizing
        ({"type": "generate", "id": 1, "prompt": "é" * 16377}, "prompt_too_long", 1,
         "32754 bytes of text; this server takes at most 32752"),
        ({**gen, "max_new_tokens": 0}, "invalid_request", 1, "max_new_tokens"),
        ({**gen, "max_new_tokens": 4097}, "invalid_request", 1, "max_new_tokens"),
        ({**gen, "prompt_ids": [512]}, "invalid_request", 1, "prompt_ids"),
        ({**gen, "prompt": "x"}, "invalid_request", 1, "prompt"),
        ({**gen, "top_p": 0}, "invalid_request", 1, "top_p"),
        ({**gen, "stop": [""]}, "invalid_request", 1, "stop"),
        ({"type": "generate", "id": 1, "prompt": ""}, "invalid_request", 1, "empty"),
        ({"type": "abort", "id": "nobody"}, "not_found", "nobody", "nobody"),
    ]
    for request, code, rid, text in cases:
        frames = request if isinstance(request, list) else [msgpack.packb(request)]
        reply = error_of(frames)
        assert (reply["code"], reply["id"]) == (code, rid), (request, reply)
        assert text in reply["message"], (request, reply)

    # duplicate id: a second generate while the first is in progress
    client.send({"type": "generate", "id": "dup", "prompt_ids": [1], "max_new_tokens": 2000,
                 "ignore_eos": True})
    assert client.next_for("dup")["type"] == "token"
    client.send({"type": "generate", "id": "dup", "prompt_ids": [1]})
    dup = client.next_for("dup", ("error",))  # among the first one's tokens
    assert (dup["type"], dup["code"]) == ("error", "duplicate_id")
    client.send({"type": "abort", "id": "dup"})
    assert client.next_for("dup", ("final",))["finish_reason"] == "abort"
    assert client.next_for("dup", ("aborted",))

    # still healthy, still serving
    assert wait_idle(client)["status"] == "ok"
    assert client.generate(9, prompt_ids=[4, 5], max_new_tokens=3)[-1]["finish_reason"] == \
        "length"


@pytest.mark.timeout(180)
def test_a_full_admission_queue_answers_overloaded(model, tmp_path):
    srv = Server(model, tmp_path / "server.log", "--max-waiting", "2")
    client = RawClient(srv.address)
    try:
        for i in range(6):
            client.send({"type": "generate", "id": i, "prompt_ids": [1, 2, 3],
                         "max_new_tokens": 1000, "ignore_eos": True})
        first = {i: client.next_for(i) for i in range(6)}
        overloaded = [i for i, r in first.items() if r.get("code") == "overloaded"]
        admitted = [i for i, r in first.items() if r["type"] == "token"]
        assert len(admitted) == 2 and len(overloaded) == 4, first
        for i in admitted:
            client.send({"type": "abort", "id": i})
            assert client.next_for(i, ("aborted",))
        assert wait_idle(client)["status"] == "ok"
        replies = client.generate("after", prompt_ids=[1, 2, 3], max_new_tokens=4)
        assert replies[-1]["finish_reason"] == "length" and len(replies) == 5
    finally:
        client.close()
        assert srv.stop() == 0


@pytest.mark.timeout(120)
def test_a_public_address_without_curve_is_refused(model, tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "moeflow", "serve", str(model), *args],
                              capture_output=True, text=True, timeout=100)

    out = serve("--bind", "tcp://0.0.0.0:5999")
    assert out.returncode == 2 and out.stdout == ""
    assert "refusing to bind tcp://0.0.0.0:5999" in out.stderr
    assert "--curve-secret-key" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    public, _ = zmq.auth.create_certificates(tmp_path, "server")
    out = serve("--curve-secret-key", public, "--curve-public-keys", str(tmp_path))
    assert out.returncode == 2 and "no secret key" in out.stderr
    out = serve("--curve-secret-key", str(public).replace(".key", ".key_secret"))
    assert out.returncode == 2 and "--curve-public-keys" in out.stderr


@pytest.mark.timeout(180)
def test_curve_lets_in_allowed_keys_only(model, tmp_path):
    for name in ("server", "allowed", "stranger"):
        (tmp_path / name).mkdir()
    _, server_secret = zmq.auth.create_certificates(tmp_path / "server", "server")
    _, allowed_secret = zmq.auth.create_certificates(tmp_path / "allowed", "client")
    _, stranger_secret = zmq.auth.create_certificates(tmp_path / "stranger", "client")
    srv = Server(model, tmp_path / "server.log", "--curve-secret-key", server_secret,
                 "--curve-public-keys", str(tmp_path / "allowed"))
    server_public, _ = zmq.auth.load_certificate(server_secret)

    def curve_client(secret_file: str) -> RawClient:
        public, secret = zmq.auth.load_certificate(secret_file)
        return RawClient(srv.address, curve_serverkey=server_public, curve_publickey=public,
                         curve_secretkey=secret)

    clients = [curve_client(allowed_secret), curve_client(stranger_secret),
               RawClient(srv.address)]
    allowed, stranger, plain = clients
    try:
        assert "CURVE" in srv.ready_line
        assert allowed.ask({"type": "health"})["status"] == "ok"
        assert allowed.generate(1, prompt_ids=[3, 4], max_new_tokens=3)[-1]["type"] == "final"
        for outsider in (stranger, plain):
            # refused: either the message cannot even go out (no handshake completes), or
            # it goes nowhere and no reply comes
            outsider.socket.setsockopt(zmq.SNDTIMEO, 2000)
            try:
                outsider.send({"type": "health"})
            except zmq.Again:
                continue
            with pytest.raises(TimeoutError):
                outsider.recv(timeout=2.0)
        import moeflow  # the Python client speaks CURVE too

        public, secret = zmq.auth.load_certificate(allowed_secret)
        with moeflow.Client(srv.address, curve_server_key=server_public,
                            curve_public_key=public, curve_secret_key=secret,
                            timeout=30) as c:
            assert c.health()["status"] == "ok"
    finally:
        for c in clients:
            c.close()
        assert srv.stop() == 0


@pytest.mark.timeout(60)
def test_prometheus_endpoint(server, client):
    assert server.metrics_url and server.metrics_url.startswith("http://127.0.0.1:")
    client.generate("prom", prompt_ids=[7, 8], max_new_tokens=3)
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    assert 'moeflow_requests_total{status="length"}' in text
    generated = [line for line in text.splitlines()
                 if line.startswith("moeflow_generated_tokens_total ")]
    assert generated and int(generated[0].split()[1]) >= 3
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.metrics_url.replace("/metrics", "/nope"), timeout=10)
    assert info.value.code == 404


@pytest.mark.timeout(60)
def test_the_python_example_in_the_protocol_doc_runs(server):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    example = doc.split("## Python with raw pyzmq and msgpack", 1)[1]
    code = example.split("```python\n", 1)[1].split("```", 1)[0]
    assert "tcp://127.0.0.1:5555" in code
    run = subprocess.run([sys.executable, "-c", code.replace("tcp://127.0.0.1:5555",
                                                             server.address)],
                         capture_output=True, text=True, timeout=50)
    assert run.returncode == 0, run.stderr
    assert "length" in run.stdout and "completion_tokens" in run.stdout


@pytest.mark.timeout(120)
def test_python_clients_round_trip(server):
    import moeflow
    from moeflow.serve.client import ServerError

    with moeflow.Client(server.address, timeout=30) as c:
        assert c.health()["vocab_size"] == 512
        replies = list(c.generate(prompt_ids=[1, 2, 3], max_new_tokens=4, ignore_eos=True))
        assert [r["type"] for r in replies] == ["token"] * 4 + ["final"]
        assert c.metrics()["generated_tokens"] >= 4
        with pytest.raises(ServerError) as info:
            list(c.generate(prompt_ids=[1], max_new_tokens=0))
        assert info.value.code == "invalid_request"
        with pytest.raises(ServerError) as info:
            c.abort("nope")
        assert info.value.code == "not_found"
        for reply in c.generate(prompt_ids=[1, 2], max_new_tokens=2000, ignore_eos=True):
            break  # leaving early aborts it on the server
        watcher = RawClient(server.address)
        assert wait_idle(watcher)["running"] == 0
        watcher.close()

    async def several() -> None:
        async with moeflow.AsyncClient(server.address, timeout=30) as ac:
            async def run(prompt: list[int]) -> list[dict[str, Any]]:
                return [r async for r in ac.generate(prompt_ids=prompt, max_new_tokens=5,
                                                     ignore_eos=True)]
            prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
            results = await asyncio.gather(*(run(p) for p in prompts))
            for prompt, replies in zip(prompts, results):
                assert [r["type"] for r in replies] == ["token"] * 5 + ["final"]
                assert replies[-1]["usage"]["prompt_tokens"] == len(prompt)
                assert len({r["id"] for r in replies}) == 1
            alone = await run([4, 5])
            assert alone[-1]["token_ids"] == results[1][-1]["token_ids"]

            async def long() -> str:
                async for reply in ac.generate(prompt_ids=[1], id="slow", max_new_tokens=2000,
                                               ignore_eos=True):
                    if reply["type"] == "final":
                        return reply["finish_reason"]
                return "?"
            async with asyncio.TaskGroup() as tasks:
                reason = tasks.create_task(long())
                await asyncio.sleep(0.3)
                await ac.abort("slow")
            assert reason.result() == "abort"
            assert (await ac.health())["status"] == "ok"

    asyncio.run(several())


@pytest.mark.timeout(180)
def test_bench_against_the_server(server, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "moeflow", "bench", "--connect", server.address,
                          "--workload", "poisson:rate=20", "--num-requests", "6",
                          "--prompt-len", "uniform:4-12", "--output-len", "uniform:2-6",
                          "--json", str(out), "--timeout", "120"],
                         capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stderr
    assert "throughput:" in run.stdout and "output tok/s" in run.stdout
    for row in ("ttft ms", "tpot ms", "e2e ms", "p50", "p90", "p99", "0 errors"):
        assert row in run.stdout, run.stdout
    assert "bench" in run.stderr  # the progress bar
    result = json.loads(out.read_text())
    assert len(result["records"]) == 6 and result["summary"]["num_errors"] == 0
    assert all(2 <= r["completion_tokens"] <= 6 and r["completion_tokens"] == r["max_new_tokens"]
               and r["ttft_ms"] is not None for r in result["records"])
    assert result["summary"]["output_tokens"] == sum(r["completion_tokens"]
                                                     for r in result["records"])


def nested(depth: int) -> Any:
    """1 inside `depth` arrays."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(240)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_sigterm_aborts_in_flight_requests_and_stops_the_actor_processes(model, tmp_path):
    srv = Server(model, tmp_path / "server.log", "--transport", "zmq",
                 "--devices", "cpu:0,cpu:1")
    client = RawClient(srv.address)
    try:
        actors = _descendants(srv.proc.pid)
        assert len(actors) >= 2
        client.send({"type": "generate", "id": "x", "prompt_ids": [1, 2], "ignore_eos": True,
                     "max_new_tokens": 4000})
        assert client.next_for("x")["type"] == "token"
        srv.proc.send_signal(signal.SIGTERM)
        final = client.next_for("x", ("final",), timeout=60)
        assert final["finish_reason"] == "abort"
        assert srv.stop() == 0
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in actors) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in actors), srv.log.read_text()
    finally:
        client.close()
        srv.kill()
