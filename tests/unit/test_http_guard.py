"""The HTTP front end's guard, as an ASGI middleware over a stub app: what a web page the
user opens may send a loopback server without a key is refused, and nothing else."""

from __future__ import annotations

import asyncio

from moeflow.serve.http import _Guard


def status_of(guard: _Guard, method: str, path: str, headers: dict[str, str]) -> int:
    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message):
        sent.append(message)

    guard.app = app
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(guard(scope, None, send))
    return sent[0]["status"]


JSON = {"Content-Type": "application/json"}


def test_a_loopback_server_without_a_key_takes_local_hosts_and_json_only():
    guard = _Guard(None, None, ("api.example.com",))
    for host in ("localhost", "localhost:8000", "LOCALHOST.", "127.0.0.1:8000", "127.0.0.1.",
                 "[::1]:8000", "app.localhost", "api.example.com", "api.example.com.:443",
                 "127.1:8000", "2130706433", "[::ffff:127.0.0.1]:8000"):
        assert status_of(guard, "POST", "/v1/completions", {"Host": host, **JSON}) == 200, host
    assert status_of(guard, "GET", "/health", {}) == 200  # no Host: HTTP/1.0, no browser
    for host in ("rebind.attacker.example:8000", "127.0.0.1.evil.example", "example.com",
                 "localhost@evil.example", "[::ffff:10.0.0.1]", "0.0.0.0"):
        assert status_of(guard, "GET", "/health", {"Host": host}) == 403, host
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""):
        headers = {"Host": "localhost", **({"Content-Type": kind} if kind else {})}
        assert status_of(guard, "POST", "/v1/completions", headers) == 415, kind
    for kind in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert status_of(guard, "POST", "/v1/completions",
                         {"Host": "localhost", "Content-Type": kind}) == 200, kind


def test_with_a_key_the_key_is_the_gate():
    guard = _Guard(None, "s3cret")
    key = {"Authorization": "Bearer s3cret"}
    # any host, any body type: a page cannot send the key without asking first
    assert status_of(guard, "POST", "/v1/completions", {"Host": "api.example.com", **key}) == 200
    assert status_of(guard, "POST", "/v1/completions", {"Host": "x", **JSON}) == 401
    assert status_of(guard, "GET", "/health", {"Host": "x"}) == 200


def test_an_allowed_host_must_be_a_host_name():
    import pytest

    from moeflow.serve.config import EngineConfig
    from moeflow.serve.server import ServerConfig

    for bad in ("http://api.example.com", "", "user@host", "a b"):
        with pytest.raises(ValueError, match="--allowed-host"):
            ServerConfig(EngineConfig("/m"), allowed_hosts=(bad,))
    ServerConfig(EngineConfig("/m"), allowed_hosts=("api.example.com", "proxy:8443"))
