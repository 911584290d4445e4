"""ASGI apps served by uvicorn inside the request server's own event loop: the OpenAI front
end (moeflow/serve/http.py) and `--metrics-port`'s Prometheus endpoint.

uvicorn normally owns its loop and the process's signals; here the request server owns
both (it stops every front end in order on SIGINT/SIGTERM), so `HttpEndpoint` runs
uvicorn's `serve` on a socket it has bound itself and leaves the signals alone.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

GRACEFUL_S = 10  # at shutdown, how long uvicorn waits for calls in progress to end
# connections and requests served at once by default; more get 503 at once (one client
# holding many half-sent requests cannot use up the process's file descriptors)
MAX_CONNECTIONS = 512
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HttpEndpoint:
    """An ASGI app served by uvicorn on HOST:PORT in the running event loop: `start()` binds
    (so that a busy port fails plainly, before serving starts), `run()` serves until
    `stop()`, `close()` lets go of the socket."""

    def __init__(self, app: Any, host: str, port: int,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.app, self.host, self.port = app, host, port
        self.max_connections = max_connections
        self.address: str | None = None  # http://host:port once bound
        self._socket: socket.socket | None = None
        self._uvicorn: Any = None

    def start(self) -> str:
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ValueError(f"cannot serve HTTP on {self.host}:{self.port}: "
                             f"{exc.strerror or exc}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self._socket = sock
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"http://{host}:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, http="httptools", lifespan="off",
                                log_level="warning", access_log=False,
                                timeout_graceful_shutdown=GRACEFUL_S,
                                limit_concurrency=self.max_connections)
        self._uvicorn = _uvicorn_server(config)
        return self.address

    async def run(self) -> None:
        assert self._uvicorn is not None and self._socket is not None
        await self._uvicorn.serve(sockets=[self._socket])

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()


def metrics_app(metrics: Any) -> Any:
    """GET /metrics alone: `metrics.prometheus()` (for `moeflow serve --metrics-port`)."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def serve(request: Any) -> Any:
        return Response(metrics.prometheus(), media_type=PROMETHEUS_TYPE)

    return Starlette(routes=[Route("/metrics", serve, methods=["GET"])])


def _uvicorn_server(config: Any) -> Any:
    """A uvicorn server for a loop it does not own: the request server handles signals."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    return Server(config)
