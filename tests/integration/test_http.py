"""The OpenAI-compatible HTTP front end end to end: `moeflow serve --http` in a subprocess,
driven by the real `openai` client (and by raw HTTP where the client hides the wire)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from serve_harness import Server

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model(tiny_factory) -> Path:
    from moeflow.models.tiny import TinyShape

    # a long context: a request of 8000 tokens outlasts the tests that leave it
    return tiny_factory("qwen3_moe", shape=TinyShape(max_positions=16384))


@pytest.fixture(scope="module")
def server(model, tmp_path_factory) -> Iterator[Server]:
    # HTTP and ZeroMQ over one engine, two devices
    srv = Server(model, tmp_path_factory.mktemp("http") / "server.log", "--http",
                 "127.0.0.1:0", "--devices", "cpu:0,cpu:1", "--max-waiting", "32",
                 "--max-new-tokens-limit", "16000")
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def name(client) -> str:
    return client.models.list().data[0].id


def health(server: Server) -> dict:
    import urllib.request

    with urllib.request.urlopen(server.http_url + "/health", timeout=30) as reply:
        return json.loads(reply.read())


def aborted(server: Server) -> int:
    """Requests the engine has ended with finish_reason "abort" (Prometheus)."""
    import urllib.request

    with urllib.request.urlopen(server.http_url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    key = 'moeflow:request_success_total{finished_reason="abort"} '
    return next((int(line.split()[-1]) for line in text.splitlines()
                 if line.startswith(key)), 0)


def wait_idle(server: Server, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = health(server)
        if report["running"] == 0 and report["waiting"] == 0:
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.1)


@pytest.fixture(scope="module")
def greedy(model) -> dict:
    """`moeflow generate`'s greedy answer to PROMPT: the reference for the HTTP side."""
    run = subprocess.run([sys.executable, "-m", "moeflow", "generate", str(model), "--prompt",
                          PROMPT, "--max-new-tokens", "12", "--json"],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_models_lists_the_served_model(client, model):
    [entry] = client.models.list().data
    assert entry.id == str(model) and entry.owned_by == "moeflow"


def test_greedy_completion_equals_moeflow_generate(client, name, greedy):
    reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert reply.choices[0].token_ids == greedy["token_ids"]
    assert reply.choices[0].text == greedy["text"]
    assert reply.usage.completion_tokens == len(greedy["token_ids"]) == 12
    assert reply.choices[0].finish_reason == "length"
    # token ids as the prompt, as OpenAI allows: the same prompt, the same answer
    ids = reply.usage.prompt_tokens
    tokens = json.loads(_post(client, "/tokenize", {"prompt": PROMPT}))["tokens"]
    assert len(tokens) == ids
    again = client.completions.create(model=name, prompt=tokens, max_tokens=12, temperature=0)
    assert again.choices[0].text == greedy["text"]


def test_streamed_completion_with_usage(client, name, greedy):
    stream = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"return_token_ids": True})
    chunks = list(stream)
    content, usage = chunks[:-1], chunks[-1]
    assert len(content) == 12  # one chunk per token, the last with the finish_reason
    assert [c.choices[0].token_ids for c in content] == [[t] for t in greedy["token_ids"]]
    assert [c.choices[0].finish_reason for c in content] == [None] * 11 + ["length"]
    assert "".join(c.choices[0].text for c in content) == greedy["text"]
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + 12


def test_logprobs_of_completions_and_chat(client, name, greedy):
    """Greedy tokens are the most likely: each one's log-probability is its top entry's,
    streamed or not, in completions' shape and in chat's."""
    reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0,
                                      logprobs=3)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) <= 3 and max(top.values()) == pytest.approx(value)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    stream = client.completions.create(model=name, prompt=PROMPT, max_tokens=6,
                                       temperature=0, logprobs=3, stream=True)
    streamed = [c.choices[0].logprobs.token_logprobs[0] for c in stream]
    assert streamed == pytest.approx(lp.token_logprobs)
    chat = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        raw = bytes(entry.bytes)  # a piece of a character: "bytes:\\xNN"
        assert entry.token == (raw.decode() if raw.decode(errors="replace") == raw.decode(
            errors="ignore") else "bytes:" + "".join(f"\\x{b:02x}" for b in raw))
    joined = bytes(b for entry in content for b in entry.bytes)
    assert joined.decode(errors="replace") == chat.choices[0].message.content
    plain = client.completions.create(model=name, prompt=PROMPT, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_chat_streaming_and_not(client, name):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=8,
                                           temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 8
    stream = client.chat.completions.create(model=name, messages=messages, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8
    # the prompt is the template's rendering: the chat has more tokens than its words
    assert whole.usage.prompt_tokens > len("Be brief. Tell me a story.".split())


def test_stop_strings_cut_the_text_and_are_never_streamed(client, name, greedy):
    text = greedy["text"]
    cut = next(i for i in range(2, len(text) - 2) if text[i:i + 2].strip() == text[i:i + 2]
               and "\ufffd" not in text[i:i + 2])
    stop = text[cut:cut + 2]
    first = text.index(stop)
    reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0,
                                      stop=[stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == text[:first]
    stream = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0,
                                       stop=stop, stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == text[:first] and stop not in streamed
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_closing_a_stream_aborts_it_and_frees_its_slot(client, name, server):
    before = aborted(server)
    stream = client.completions.create(model=name, prompt=PROMPT, max_tokens=8000,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for _, _ in zip(range(3), stream):
        pass
    assert health(server)["running"] == 1
    stream.close()
    wait_idle(server)
    assert aborted(server) == before + 1  # ended by the abort, not by its 8000 tokens
    # the server goes on serving
    reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_a_client_leaving_a_plain_request_aborts_it(server, name):
    before = aborted(server)

    async def leave() -> int:
        # 8000 tokens take far longer than the 2 s this client waits
        body = {"model": name, "prompt": PROMPT, "max_tokens": 8000, "ignore_eos": True}
        async with aiohttp.ClientSession() as session:
            async def running() -> int:
                await asyncio.sleep(1.0)
                async with session.get(server.http_url + "/health") as reply:
                    return (await reply.json())["running"]

            during = asyncio.create_task(running())
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(2.0):
                    await session.post(server.http_url + "/v1/completions", json=body)
            return await during

    assert asyncio.run(leave()) == 1
    wait_idle(server)
    assert aborted(server) == before + 1  # ended by the abort, not by its 8000 tokens


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),

    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({}, "prompt"),
])
def test_bad_completion_requests_get_400_with_openai_errors(client, name, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/completions", body={"model": name, **body}, cast_to=object)
    error = info.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


@pytest.mark.parametrize("messages", [[], [{"role": "robot", "content": "x"}],
                                      [{"role": "user", "content": 3}],
                                      [{"role": "user", "content": [{"type": "image_url"}]}],
                                      [{"role": "user", "content": "x", "extra": 1}]])
def test_bad_chat_messages_get_400(client, name, messages):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=name, messages=messages)
    assert info.value.body["param"] == "messages"


def test_unknown_model_is_404_and_bad_json_is_400(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="x")
    assert info.value.body["code"] == "model_not_found"
    [listed] = client.models.list().data
    assert client.models.retrieve(listed.id) == listed
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=listed.id, prompt="x", stream=True,
                                  stream_options={"include_usage": "yes"})  # type: ignore
    assert info.value.body["param"] == "stream_options"
    deep = [b'{"prompt": "x", "user": ' + b"[" * n + b"]" * n + b"}" for n in (40, 5000)]
    for body in (b"{", b"[1, 2]", b"\xff", *deep):
        status, reply = _raw(server.http_url + "/v1/completions", body)
        assert status == 400 and json.loads(reply)["error"]["code"] == "malformed"


def test_an_unpaired_surrogate_is_a_400_not_a_500(server, name):
    """JSON may carry a lone \\ud800 (a JavaScript string cut inside an emoji): it is no
    Unicode text, and is refused with OpenAI's error body, wherever it stands."""
    bodies = [
        ("/v1/completions", '{"model": "%s", "prompt": "a\\ud83c", "max_tokens": 1}'),
        ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", '
                                 '"content": "a\\ud83c"}], "max_tokens": 1}'),
        ("/v1/completions", '{"model": "%s", "prompt": "a", "\\udc00": 1}'),
        ("/tokenize", '{"model": "%s", "prompt": "\\udfff"}')]
    for path, body in bodies:
        status, reply = _raw(server.http_url + path, (body % name).encode())
        assert status == 400, (path, body, reply)
        assert json.loads(reply)["error"]["code"] == "malformed"
    # a whole pair (and an escaped backslash before a "u") is text as usual
    for text in ("a\\ud83c\\udf89", "a\\\\ud800"):
        body = '{"model": "%s", "prompt": "%s", "max_tokens": 1}' % (name, text)
        status, reply = _raw(server.http_url + "/v1/completions", body.encode())
        assert status == 200, (text, reply)


def test_a_body_larger_than_any_valid_call_is_refused_unparsed(server, name):
    """The body limit follows the prompt limits (this model's: under 2 MiB, not 8): a
    prompt a little over the limit is parsed and refused by name, a body of 3 MiB (of
    nested arrays, say) is refused before any of it is read."""
    health = json.loads(urllib_get(server.http_url + "/health"))
    most = 16 * (health["max_position_embeddings"] - 1)  # the default prompt bytes
    over = json.dumps({"model": name, "prompt": "a" * (most + 100), "max_tokens": 1})
    status, reply = _raw(server.http_url + "/v1/completions", over.encode())
    assert status == 400 and "bytes" in json.loads(reply)["error"]["message"]
    status, reply = _announced(server.http_url, "/v1/completions", 3 << 20)
    assert status == 413 and json.loads(reply)["error"]["code"] == "body_too_large"


def test_a_client_leaving_before_its_body_arrives_logs_no_traceback(server, name):
    """A client that hangs up with its body half sent (a timeout on a slow upload, a proxy
    dropping the connection) is nobody to answer: no request runs, and the log gets no
    "Exception in ASGI application" traceback for it."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(server.http_url)
    body = json.dumps({"model": name, "prompt": PROMPT, "max_tokens": 4}).encode()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        for sent in (0, len(body) // 2):
            head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
            with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
                sock.sendall(head.encode() + body[:sent])
    status, _ = _raw(server.http_url + "/v1/completions", body)  # the server goes on
    assert status == 200
    wait_idle(server)
    log = server.log.read_text()
    assert "ClientDisconnect" not in log and "Exception in ASGI application" not in log, \
        log[-3000:]


def urllib_get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.read()


def test_a_web_page_cannot_drive_a_loopback_server(server, name):
    """A page on another origin can POST a form or text/plain without asking first, and
    by DNS rebinding reach 127.0.0.1 under its own host name: both are refused."""
    body = json.dumps({"model": name, "prompt": "x", "max_tokens": 1}).encode()
    url = server.http_url + "/v1/completions"
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        status, reply = _raw(url, body, {"Content-Type": kind})
        error = json.loads(reply)["error"]
        assert status == 415 and error["code"] == "unsupported_media_type"
        assert error["type"] == "invalid_request_error"  # the client's doing, not the server's
    port = server.http_url.rsplit(":", 1)[1]
    for path, data in (("/v1/completions", body), ("/health", None), ("/v1/models", None)):
        status, reply = _raw(server.http_url + path, data, {
            "Host": f"rebind.attacker.example:{port}", "Content-Type": "application/json"})
        error = json.loads(reply)["error"]
        assert status == 403 and error["code"] == "forbidden_host", path
        assert error["type"] == "invalid_request_error", path
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        status, _ = _raw(url, body, {"Host": host, "Content-Type": "application/json"})
        assert status == 200, host


def test_sixteen_concurrent_streams_are_complete_and_well_formed(server, name):
    async def one(session: aiohttp.ClientSession, i: int) -> tuple[list[dict], bytes]:
        body = {"model": name, "prompt": f"{PROMPT} {i}", "max_tokens": 6 + i % 5,
                "temperature": 0.8, "seed": i, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        async with session.post(server.http_url + "/v1/completions", json=body) as reply:
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            raw = await reply.read()
        events = [e for e in raw.decode().split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events), raw[:200]
        assert events[-1] == "data: [DONE]"
        return [json.loads(e[6:]) for e in events[:-1]], raw

    async def run() -> list[tuple[list[dict], bytes]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one(session, i) for i in range(16)))

    results = asyncio.run(run())
    for i, (chunks, _) in enumerate(results):
        content, usage = chunks[:-1], chunks[-1]["usage"]
        assert len(content) == usage["completion_tokens"] == 6 + i % 5
        assert content[-1]["choices"][0]["finish_reason"] == "length"
        assert len({c["id"] for c in chunks}) == 1
    wait_idle(server)


def test_health_metrics_tokenize_version(server, client, name):
    report = health(server)
    assert report["status"] == "ok" and report["vocab_size"] > 0
    assert report["model"] == name  # the name a request gives, as /v1/models lists it
    import urllib.request

    with urllib.request.urlopen(server.http_url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    assert "moeflow:request_success_total" in text and "moeflow:request_rejected_total" in text
    with urllib.request.urlopen(server.http_url + "/version", timeout=30) as reply:
        assert json.loads(reply.read())["version"]
    tokens = json.loads(_post(client, "/tokenize", {"messages": [
        {"role": "user", "content": "hi"}]}))
    assert tokens["count"] == len(tokens["tokens"]) > 1
    assert json.loads(_post(client, "/tokenize", {"model": name, "prompt": "hi"}))["count"]
    status, reply = _raw(server.http_url + "/tokenize",
                         json.dumps({"model": "gpt-4", "prompt": "hi"}).encode())
    assert status == 404 and json.loads(reply)["error"]["code"] == "model_not_found"
    status, reply = _announced(server.http_url, "/v1/completions", 9 << 20)
    assert status == 413 and json.loads(reply)["error"]["code"] == "body_too_large"
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=30) as reply:
        assert 'moeflow:request_rejected_total{code="body_too_large"}' in reply.read().decode()


def test_a_public_address_needs_an_api_key(model, tmp_path):
    run = subprocess.run([sys.executable, "-m", "moeflow", "serve", str(model), "--http",
                          "0.0.0.0:0"], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 2 and "--api-key" in run.stderr


def test_api_key_overload_and_chat_template_override(model, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    srv = Server(model, tmp_path / "server.log", "--http", "0.0.0.0:0", "--api-key", "s3cret",
                 "--max-waiting", "1", "--chat-template", str(template), bind=None)
    try:
        url = srv.http_url.replace("0.0.0.0", "127.0.0.1")
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        status, _ = _raw(url + "/v1/models", None)
        assert status == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        name = good.models.list().data[0].id
        # the override renders the messages as plain lines
        tokens = json.loads(_post(good, "/tokenize", {"messages": [
            {"role": "user", "content": "hello"}]}, key="s3cret"))
        plain = json.loads(_post(good, "/tokenize", {"prompt": "hello\n"}, key="s3cret"))
        assert tokens["tokens"] == plain["tokens"]
        # one request in progress fills this server: the next gets 429
        stream = good.completions.create(model=name, prompt=PROMPT, max_tokens=2000,
                                         stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as info:
            good.completions.create(model=name, prompt=PROMPT, max_tokens=2)
        assert info.value.body["code"] == "overloaded"
        # shutdown ends the call in progress with "abort", and the server exits cleanly
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "abort"
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def test_shutdown_keeps_a_plain_calls_text_and_usage(model, tmp_path):
    """At shutdown a call in progress ends with "abort", streamed or not, and says what it
    generated so far: its tokens, its text and their count in the usage."""
    srv = Server(model, tmp_path / "server.log", "--http", "127.0.0.1:0", bind=None)
    try:
        client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused",
                               max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        stream = client.completions.create(model=name, prompt=PROMPT, max_tokens=4000,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            plain = pool.submit(client.completions.create, model=name, prompt=PROMPT,
                                max_tokens=4000, extra_body={"ignore_eos": True,
                                                             "return_token_ids": True})
            deadline = time.monotonic() + 60
            while health(srv)["running"] < 2:  # both running, and some tokens made
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)
            srv.proc.send_signal(signal.SIGTERM)
            reply = plain.result(timeout=60)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "abort"
        choice = reply.choices[0]
        assert choice.finish_reason == "abort"
        ids = choice.model_extra["token_ids"]
        assert 0 < len(ids) == reply.usage.completion_tokens
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + len(ids)
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def test_stop_strings_without_a_tokenizer_are_a_400(tiny_factory, tmp_path):
    """A checkpoint without tokenizer.json serves token-id prompts; a stop string could
    never match there, so asking for one is refused, not run to max_tokens."""
    path = tiny_factory("qwen3_moe", tokenizer=False)
    srv = Server(path, tmp_path / "server.log", "--http", "127.0.0.1:0", bind=None)
    try:
        client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused",
                               max_retries=0)
        name = client.models.list().data[0].id
        with pytest.raises(openai.BadRequestError, match="stop strings need"):
            client.completions.create(model=name, prompt=[1, 2, 3], max_tokens=4, stop="a")
        reply = client.completions.create(model=name, prompt=[1, 2, 3], max_tokens=4)
        assert reply.usage.completion_tokens >= 1
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def _post(client: openai.OpenAI, path: str, body: dict, key: str | None = None) -> str:
    import urllib.request

    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=30) as reply:
        return reply.read().decode()


def _announced(base: str, path: str, size: int) -> tuple[int, bytes]:
    """POST headers announcing a body of `size` bytes, and the reply, no body sent: a
    server that refuses by the header answers at once."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(base)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("content-type", "application/json")
        conn.putheader("content-length", str(size))
        conn.endheaders()
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def _raw(url: str, body: bytes | None, headers: dict[str, str] | None = None
         ) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers=headers or (
        {"Content-Type": "application/json"} if body is not None else {}))
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_examples_in_docs_http_run(model, tmp_path):
    import re
    import shlex
    import shutil

    doc = (Path(__file__).resolve().parents[2] / "docs" / "http.md").read_text()
    sh = [b.replace("\\\n", " ") for b in re.findall(r"```sh\n(.*?)```", doc, flags=re.S)]
    [serve] = [line for b in sh for line in b.splitlines() if line.startswith("moeflow serve")]
    argv = shlex.split(serve.replace("/tmp/tiny", str(model)).replace("127.0.0.1:8000",
                                                                       "127.0.0.1:0"))
    srv = Server(model, tmp_path / "server.log", *argv[3:], bind=None)
    try:
        where = srv.http_url.removeprefix("http://")
        [code] = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
        run = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:8000", where)],
                             capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "completion_tokens=16" in run.stdout
        calls = [line for b in sh for line in b.splitlines() if line.startswith("curl ")]
        assert len(calls) == 3
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed")
        for line in calls:
            run = subprocess.run(shlex.split(line.replace("127.0.0.1:8000", where)),
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 0 and '"error"' not in run.stdout, (line, run.stdout)
            assert "tiny" in run.stdout
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def test_chat_without_a_template_is_a_clear_400(model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for item in model.iterdir():
        if item.name != "tokenizer_config.json":
            (bare / item.name).symlink_to(item)
    srv = Server(bare, tmp_path / "server.log", "--http", "127.0.0.1:0", bind=None)
    try:
        client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=str(bare), max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
        assert info.value.body["code"] == "no_chat_template"
        assert "--chat-template" in info.value.body["message"]
        reply = client.completions.create(model=str(bare), prompt=PROMPT, max_tokens=2)
        assert reply.usage.completion_tokens == 2
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def _with_bos_tokenizer(model: Path, out: Path) -> Path:
    """`model` with a tokenizer that adds a BOS itself (its <|pad|>) and a template that
    writes {{ bos_token }}, as Mixtral's and DeepSeek's do."""
    from tokenizers import Tokenizer, processors

    out.mkdir()
    for item in model.iterdir():
        if item.name not in ("tokenizer.json", "tokenizer_config.json"):
            (out / item.name).symlink_to(item)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    bos = tok.token_to_id("<|pad|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|pad|> $A", pair="<|pad|> $A <|pad|> $B", special_tokens=[("<|pad|>", bos)])
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(bos_token="<|pad|>", chat_template=(
        "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_a_chat_template_that_writes_its_bos_gets_one(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = _with_bos_tokenizer(model, tmp_path / "bos")
    messages = [{"role": "user", "content": "hello there"}]
    expected = transformers.AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True)
    expected = list(getattr(expected, "input_ids", expected))
    srv = Server(path, tmp_path / "server.log", "--http", "127.0.0.1:0", bind=None)
    try:
        client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", max_retries=0)
        bos = expected[0]
        chat = json.loads(_post(client, "/tokenize", {"messages": messages}))["tokens"]
        assert chat == expected and chat.count(bos) == 1
        prompt = json.loads(_post(client, "/tokenize", {"prompt": "hello"}))["tokens"]
        bare = json.loads(_post(client, "/tokenize", {"prompt": "hello",
                                                      "add_special_tokens": False}))["tokens"]
        assert prompt == [bos, *bare] and bos not in bare
        reply = client.chat.completions.create(model=str(path), messages=messages,
                                               max_tokens=2)
        assert reply.usage.prompt_tokens == len(expected)
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def test_a_surrogate_sent_as_raw_bytes_is_a_400_too(server, name):
    """A lone surrogate need not come as a \\u escape: json.loads decodes a body's bytes
    with "surrogatepass", so UTF-8-encoded surrogate bytes (b"\\xed\\xa0\\xbc", as WTF-8 or
    CESU-8 writers send them) and a UTF-16 body's unpaired code unit parse to one too."""
    bodies = [
        ("/v1/completions", b'{"model": "%s", "prompt": "a\xed\xa0\xbc", "max_tokens": 1}'
         % name.encode()),
        ("/tokenize", b'{"model": "%s", "prompt": "\xed\xbf\xbf"}' % name.encode()),
        ("/v1/completions", ('{"model": "%s", "prompt": "a\\ud83c", "max_tokens": 1}'
                             % name).encode("utf-16")),
    ]
    for path, body in bodies:
        status, reply = _raw(server.http_url + path, body)
        assert status == 400, (path, body, status, reply[:300])
        assert json.loads(reply)["error"]["code"] == "malformed"
