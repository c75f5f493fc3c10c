"""The small interface the server and client pumps need from a transport, and the errors a transport raises.

A :class:`Connection` sends and receives whole frames and closes with a code;
a :class:`ServerTransport` hands every accepted connection to a handler; a
:class:`ClientTransport` opens one connection at a time. Two implementations:
:mod:`~fedseg.federation.transport.websocket` (mutual TLS, deployment) and
:mod:`~fedseg.federation.transport.memory` (paired queues, tests). Backend
errors are translated at this boundary (as httpx does): the pumps only ever
see :class:`ConnectionClosed`, :class:`ConnectionLost` or a :class:`FedsegError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from fedseg.errors import FedsegError

__all__ = ["ClientTransport", "Connection", "ConnectionClosed", "ConnectionLost", "Handler", "ServerTransport"]

OK_CLOSE_CODES = frozenset({1000, 1001})  # normal closure, going away


class ConnectionClosed(FedsegError):
    """The connection is closed; ``code`` and ``reason`` are what the peer's close said (None: no close frame).

    ``clean`` is True for a normal closure (by default: ``code`` 1000 or 1001),
    False when the peer failed, closed with an error code or the link dropped.
    """

    def __init__(self, code: int | None, reason: str = "", *, detail: str = "", clean: bool | None = None) -> None:
        self.code = code
        self.reason = reason
        self.clean = code in OK_CLOSE_CODES if clean is None else clean
        super().__init__(detail or f"closed with code {code}" + (f" ({reason})" if reason else ""))


class ConnectionLost(FedsegError):
    """The connection dropped before DONE, or could not be made; worth reconnecting."""


class Connection(Protocol):
    """One open connection carrying whole protocol frames."""

    @property
    def remote_address(self) -> str:
        """Who is at the other end, for logs."""
        ...

    def peer_site(self, allowed: frozenset[str]) -> str:
        """The site the transport vouches the peer is (its TLS certificate's identity), if it is ``allowed``.

        Raises:
            UnknownSite: no verified identity, or one outside ``allowed``.
        """
        ...

    async def send(self, frame: bytes) -> None:
        """Send one frame. Raises: ConnectionClosed."""
        ...

    async def recv(self, timeout: float | None = None) -> bytes | str:
        """The next frame (a ``str`` is a text frame, which the protocol refuses).

        Raises:
            ConnectionClosed: the connection closed (cleanly or not).
            TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code`` and ``reason``; closing a closed connection does nothing."""
        ...


Handler = Callable[[Connection], Awaitable[None]]
"""The server's per-connection coroutine; the connection is closed when it returns."""


class ServerTransport(Protocol):
    def serve(self, handler: Handler) -> AbstractAsyncContextManager[None]:
        """Accept connections and run ``handler`` on each until the context exits (then close them all)."""
        ...


class ClientTransport(Protocol):
    @property
    def server(self) -> str:
        """How logs and the audit log name the server (its URL)."""
        ...

    def connect(self) -> AbstractAsyncContextManager[Connection]:
        """One connection to the server; it is closed when the context exits (with 1011 after an exception).

        Raises:
            ConnectionLost: the server cannot be reached now (worth a retry).
            FedsegError: it never will be as things stand (e.g. TLS refused the certificates).
        """
        ...
