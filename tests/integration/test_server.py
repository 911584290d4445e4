"""`moeflow serve` end to end: a server in a subprocess on a loopback port, driven by a
client written from docs/protocol.md alone (serve_harness.RawClient: raw pyzmq DEALER +
msgpack), then by moeflow.Client / AsyncClient and `moeflow bench`. Every server is stopped
with SIGTERM in teardown and must exit 0 (its engine stopped)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
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
        # msgpack bin where a string belongs, and map keys that are not strings
        ({"type": "generate", "id": 1, "prompt": b"hi"}, "invalid_request", 1,
         "prompt: expected a string, got binary"),
        ({"type": "generate", "id": b"x", "prompt": "hi"}, "invalid_request", None, "id:"),
        ({"type": b"health"}, "unknown_type", None, "b'health'"),
        ({**gen, 5: 1}, "invalid_request", 1, "field names must be strings, got an integer"),
        ({**gen, b"k": 1}, "invalid_request", 1, "field names must be strings, got binary"),
        ([b"\x82\xa4type\xa6health\x91\x01\x01"], "malformed", None, "map key"),
        # health and metrics take an id and echo it, in errors too
        ({"type": "health", "id": "h", "verbose": True}, "invalid_request", "h", "verbose"),
        ({"type": "metrics", "id": True}, "invalid_request", None, "id:"),
    ]
    for request, code, rid, text in cases:
        frames = request if isinstance(request, list) else [msgpack.packb(request)]
        reply = error_of(frames)
        assert (reply["code"], reply["id"]) == (code, rid), (request, reply)
        assert text in reply["message"], (request, reply)

    # duplicate id: a second generate while the first is in progress gets an error with a
    # nil id (an error with an id ends that request), and the first one goes on to its end;
    # so does an invalid generate that reuses the id
    client.send({"type": "generate", "id": "dup", "prompt_ids": [1], "max_new_tokens": 200,
                 "ignore_eos": True})
    first = client.next_for("dup")
    assert first["type"] == "token"
    client.send({"type": "generate", "id": "dup", "prompt_ids": [1]})
    dup = client.next_for(None, ("error",))  # among the first one's tokens
    assert (dup["code"], dup["id"]) == ("duplicate_id", None)
    assert "'dup'" in dup["message"]
    client.send({"type": "generate", "id": "dup", "prompt_ids": [1], "top_k": -1})
    bad = client.next_for(None, ("error",))
    assert (bad["code"], bad["id"]) == ("invalid_request", None)
    assert bad["message"].startswith("id 'dup': top_k:")
    replies = [first]
    while replies[-1]["type"] == "token":
        replies.append(client.next_for("dup"))
    assert [r["type"] for r in replies] == ["token"] * 200 + ["final"]
    assert replies[-1]["finish_reason"] == "length"

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


def test_a_long_prompt_is_refused_by_name_and_a_frame_of_many_arrays_unread(server, client):
    """A prompt far past the limit (a large frame, one string) still gets its
    `prompt_too_long`; a frame of a million empty arrays (seconds of decoding) is refused as
    `malformed` from its bytes, and the server goes on."""
    over = client.generate("over", prompt="a" * 300_000, max_new_tokens=1)
    assert over[-1]["code"] == "prompt_too_long"
    junk = RawClient(server.address)
    try:
        junk.socket.send(b"\x82\xa4type\xa6health\xa3pad\xdd" + (1 << 20).to_bytes(4, "big")
                         + b"\x90" * (1 << 20))
        reply = junk.recv()
        assert reply["code"] == "malformed" and "256 maps and arrays" in reply["message"]
    finally:
        junk.close()
    client.send({"type": "health", "id": "h2"})
    assert client.next_for("h2")["status"] == "ok"


def test_a_flood_of_health_queries_is_answered_or_refused_and_the_server_goes_on(server):
    """Thousands of health queries at once: each gets a health report or `overloaded` (no
    unbounded queue of replies), and the server serves generates afterwards."""
    flood = RawClient(server.address)
    try:
        for i in range(3000):
            flood.send({"type": "health", "id": f"h{i}"})
        replies = [flood.recv() for _ in range(3000)]
        kinds = {r["type"] if r["type"] == "health" else r.get("code") for r in replies}
        assert kinds <= {"health", "overloaded"} and "health" in kinds, kinds
        assert sorted(r["id"] for r in replies) == sorted(f"h{i}" for i in range(3000))
        done = flood.generate("after", prompt_ids=[1, 2, 3], max_new_tokens=2)
        assert done[-1]["finish_reason"] == "length"
    finally:
        flood.close()


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
    assert 'moeflow:request_success_total{finished_reason="length"}' in text
    generated = [line for line in text.splitlines()
                 if line.startswith("moeflow:generation_tokens_total ")]
    assert generated and int(generated[0].split()[1]) >= 3
    for name in ("moeflow:num_requests_running", "moeflow:num_requests_waiting",
                 "moeflow:prompt_tokens_total", "moeflow:time_to_first_token_seconds_bucket",
                 "moeflow:request_time_per_output_token_seconds_sum",
                 "moeflow:e2e_request_latency_seconds_count"):
        assert f"\n{name}" in text, name
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


def test_each_abort_of_a_generate_in_progress_gets_its_aborted(client):
    client.send({"type": "generate", "id": "twice", "prompt_ids": [1, 2],
                 "max_new_tokens": 2000, "ignore_eos": True})
    assert client.next_for("twice")["type"] == "token"
    client.send({"type": "abort", "id": "twice"})
    client.send({"type": "abort", "id": "twice"})
    assert client.next_for("twice", ("final",))["finish_reason"] == "abort"
    assert client.next_for("twice", ("aborted",)) == {"type": "aborted", "id": "twice"}
    # the second abort is answered too: its own aborted when it came before the final (the
    # usual case), else not_found (the id was no longer in progress); never silence
    second = client.next_for("twice", ("aborted", "error"), timeout=10)
    assert second == {"type": "aborted", "id": "twice"} or second["code"] == "not_found"


@pytest.mark.timeout(120)
def test_a_python_client_reusing_the_id_of_a_generate_it_left_gets_its_own_replies(server):
    import moeflow

    with moeflow.Client(server.address, timeout=30) as c:
        for _ in c.generate(prompt_ids=[1, 2], id="again", max_new_tokens=2000,
                            ignore_eos=True):
            break  # leaving early aborts it: "again" is in progress until its final
        replies = list(c.generate(prompt_ids=[3, 4, 5], id="again", max_new_tokens=3))
        assert [r["type"] for r in replies] == ["token"] * 3 + ["final"]
        assert [r["index"] for r in replies[:-1]] == [0, 1, 2]
        assert replies[-1]["finish_reason"] == "length"
        assert replies[-1]["usage"]["prompt_tokens"] == 3

    async def reuse() -> list[dict[str, Any]]:
        async with moeflow.AsyncClient(server.address, timeout=30) as ac:
            stream = ac.generate(prompt_ids=[1, 2], id="again", max_new_tokens=2000,
                                 ignore_eos=True)
            async for _ in stream:
                break
            await stream.aclose()
            return [r async for r in ac.generate(prompt_ids=[3, 4, 5], id="again",
                                                 max_new_tokens=3)]
    replies = asyncio.run(reuse())
    assert [r["type"] for r in replies] == ["token"] * 3 + ["final"]
    assert replies[-1]["usage"]["prompt_tokens"] == 3


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


@pytest.mark.timeout(60)
def test_health_names_the_protocol_version_and_features_and_queries_echo_an_id(client):
    health = client.ask({"type": "health"})
    assert (health["protocol_version"], health["id"]) == (2, None)
    assert {"deadline", "query_id"} <= set(health["features"])
    assert client.ask({"type": "health", "id": "h1"})["id"] == "h1"
    metrics = client.ask({"type": "metrics", "id": 77})
    assert (metrics["type"], metrics["id"]) == ("metrics", 77)


def _metrics(client: RawClient) -> dict[str, Any]:
    return client.ask({"type": "metrics", "id": "m"})


@pytest.mark.timeout(60)
def test_a_generate_past_its_deadline_is_dropped_and_counted(client):
    before = _metrics(client)["rejected"].get("deadline_exceeded", 0)
    [late] = client.generate("late", prompt_ids=[1, 2], deadline=time.time() - 1)
    assert (late["type"], late["code"], late["id"]) == ("error", "deadline_exceeded", "late")
    assert late["message"].startswith("deadline: ")
    replies = client.generate("in-time", prompt_ids=[1, 2], max_new_tokens=2,
                              deadline=time.time() + 60)
    assert replies[-1]["finish_reason"] == "length"
    assert _metrics(client)["rejected"]["deadline_exceeded"] == before + 1


@pytest.mark.timeout(60)
def test_rejected_requests_are_counted_in_metrics_and_prometheus(server, client):
    before = _metrics(client)["rejected"]
    assert client.ask({"type": "abort", "id": "nobody"})["code"] == "not_found"
    client.socket.send(b"\xc1")
    assert client.recv()["code"] == "malformed"
    assert client.ask({"type": "generate", "id": 3, "prompt_ids": [1], "top_p": 0}
                      )["code"] == "invalid_request"
    rejected = _metrics(client)["rejected"]
    for code in ("not_found", "malformed", "invalid_request"):
        assert rejected[code] == before.get(code, 0) + 1, code
    assert server.metrics_url is not None
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    for code in ("not_found", "malformed", "invalid_request"):
        assert f'moeflow:request_rejected_total{{code="{code}"}} {rejected[code]}' in text


@pytest.mark.timeout(120)
def test_a_stop_string_that_ends_inside_a_token(client):
    """docs/protocol.md: the token that completes a stop string is sent whole; the final's
    text ends just before the stop string, dropping the rest of that token's text."""
    prompt = {"prompt": "Once upon a time", "max_new_tokens": 24, "ignore_eos": True}
    texts = [r["text"] for r in client.generate("free", **prompt)[:-1]]
    full, starts = "".join(texts), [sum(map(len, texts[:k])) for k in range(len(texts))]
    # a stop string from the last character of one token into the middle of the next
    cases = [(k, full[starts[k] - 1:starts[k] + 2]) for k in range(1, len(texts))
             if len(texts[k]) >= 3 and texts[k - 1]]
    cases = [(k, stop) for k, stop in cases
             if full.find(stop) == starts[k] - 1 and "\ufffd" not in stop]
    if not cases:
        pytest.skip(f"no token of this model's output fits: {texts!r}")
    k, stop = cases[0]
    replies = client.generate("stopped", **prompt, stop=[stop])
    tokens, final = replies[:-1], replies[-1]
    assert final["finish_reason"] == "stop" and len(final["token_ids"]) == k + 1
    assert [r["text"] for r in tokens] == texts[:k + 1]  # the last one whole
    assert final["text"] == full[:starts[k] - 1]  # the stop and the rest of its token: gone


@pytest.mark.timeout(120)
def test_the_python_clients_send_a_deadline_with_a_timeout(server, monkeypatch):
    import moeflow
    from moeflow.serve import client as client_module
    from moeflow.serve.client import ServerError

    with moeflow.Client(server.address, timeout=30) as c:
        replies = list(c.generate(prompt_ids=[1, 2], max_new_tokens=2, timeout=30))
        assert replies[-1]["finish_reason"] == "length"
        assert "deadline" in c._features  # asked once, from health
        with monkeypatch.context() as patch:  # a clock in 1970: the deadline is long past
            patch.setattr(client_module.time, "time", lambda: 1e6)
            with pytest.raises(ServerError) as info:
                list(c.generate(prompt_ids=[1, 2], max_new_tokens=2, timeout=30))
        assert info.value.code == "deadline_exceeded"
        # without a timeout of its own, a generate carries no deadline, as before
        with monkeypatch.context() as patch:
            patch.setattr(client_module.time, "time", lambda: 1e6)
            assert list(c.generate(prompt_ids=[1], max_new_tokens=1))[-1]["type"] == "final"

    async def duplicate() -> None:
        async with moeflow.AsyncClient(server.address, timeout=30) as ac:
            long = ac.generate(prompt_ids=[1], id="x", max_new_tokens=2000, ignore_eos=True)
            assert (await anext(long))["type"] == "token"
            with pytest.raises(ServerError) as info:
                await anext(ac.generate(prompt_ids=[1], id="x"))
            assert info.value.code == "duplicate_id"
            await long.aclose()  # aborts it on the server

    asyncio.run(duplicate())


@pytest.mark.timeout(240)
def test_a_request_queued_while_the_server_was_down_is_dropped_past_its_deadline(model,
                                                                                tmp_path):
    """A DEALER queues what it sends before a server is up, and delivers it to whichever
    server starts there later; the deadline lets that server drop what is stale."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    client = RawClient(address)
    srv = None
    try:
        client.send({"type": "generate", "id": "stale", "prompt_ids": [1, 2],
                     "deadline": time.time() + 0.5})
        client.send({"type": "generate", "id": "fresh", "prompt_ids": [1, 2],
                     "max_new_tokens": 2, "deadline": time.time() + 600})
        time.sleep(1.0)
        srv = Server(model, tmp_path / "server.log", bind=address)
        stale = client.next_for("stale", timeout=60)
        assert (stale["type"], stale["code"]) == ("error", "deadline_exceeded")
        assert client.next_for("fresh", ("final",), timeout=60)["finish_reason"] == "length"
    finally:
        client.close()
        if srv is not None:
            assert srv.stop() == 0


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
