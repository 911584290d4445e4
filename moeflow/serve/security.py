"""Who may reach `moeflow serve`: loopback only, unless CURVE is configured.

An address that other machines can reach (anything but tcp://127.x.x.x, tcp://localhost,
tcp://[::1], ipc:// and inproc://) is refused unless the server has a CURVE secret key and
a directory of the clients' public certificates it allows; zmq's authenticator then drops
every connection whose key is not there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from moeflow.actors.plane import is_loopback


class SecurityError(ValueError):
    """A bind address or a CURVE setting the server refuses."""


def check_bind(address: str, curve: bool) -> None:
    """SecurityError unless `address` is loopback or CURVE is on; ValueError if it is no
    zmq endpoint at all."""
    scheme, sep, rest = address.partition("://")
    port = rest.rpartition(":")[2]
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest or (
            scheme == "tcp" and not (port.isdigit() or port == "*")):
        raise ValueError(f"not a zmq endpoint: {address!r}; bind e.g. tcp://127.0.0.1:5555 "
                         f"or ipc:///tmp/moeflow.sock")
    if not curve and not is_loopback(address):
        raise SecurityError(
            f"refusing to bind {address}: it is reachable from other machines and the "
            f"protocol has no authentication of its own. Bind a loopback address "
            f"(tcp://127.0.0.1:PORT, ipc://PATH) or configure CURVE with "
            f"--curve-secret-key FILE and --curve-public-keys DIR")


@dataclass(frozen=True, slots=True)
class CurveConfig:
    """The server's certificate (with its secret key) and the allowed clients' directory."""

    secret_key_file: str
    public_keys_dir: str

    def load(self) -> tuple[bytes, bytes]:
        """(public key, secret key) of the server, z85-encoded; SecurityError if unusable."""
        if not zmq.has("curve"):
            raise SecurityError("this libzmq was built without CURVE support")
        path = Path(self.secret_key_file)
        if not path.is_file():
            raise SecurityError(f"--curve-secret-key {path}: no such file")
        if not Path(self.public_keys_dir).is_dir():
            raise SecurityError(f"--curve-public-keys {self.public_keys_dir}: not a directory")
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise SecurityError(f"--curve-secret-key {path}: not a zmq certificate ({exc})"
                                ) from None
        if not secret:
            raise SecurityError(f"--curve-secret-key {path} holds no secret key (pass the "
                                f".key_secret file that zmq.auth.create_certificates wrote)")
        return public, secret


def secure(socket: zmq.Socket[Any], context: zmq.Context[Any], curve: CurveConfig) -> Any:
    """Make `socket` a CURVE server that admits only the allowed keys. Returns the started
    authenticator (stop it after closing the socket). Call before bind, in the event loop."""
    from zmq.auth.asyncio import AsyncioAuthenticator

    public, secret = curve.load()
    auth = AsyncioAuthenticator(context)
    auth.start()
    # the allowed keys are read now: restart the server to change them
    auth.configure_curve(domain="*", location=curve.public_keys_dir)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth
