"""The deployment transport: websockets over mutual TLS, behind the :mod:`~fedseg.federation.transport.connection` interface.

Takes configured :class:`ssl.SSLContext` objects (built from kits by
:mod:`~fedseg.federation.transport.tls`), never file paths. websockets'
exceptions are translated here: the pumps see :class:`ConnectionClosed`,
:class:`ConnectionLost` or a :class:`FedsegError` naming the TLS failure.
Keepalive is websockets' own ping/pong (PING_INTERVAL_S, PING_TIMEOUT_S),
independent of training; compression is off (weights barely compress).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosedOK, InvalidHandshake, InvalidMessage

from fedseg.errors import FedsegError
from fedseg.federation.protocol.constants import (
    DEFAULT_MAX_FRAME,
    OPEN_TIMEOUT_S,
    PING_INTERVAL_S,
    PING_TIMEOUT_S,
    TLS_HANDSHAKE_TIMEOUT_S,
)
from fedseg.federation.protocol.errors import UnknownSite
from fedseg.federation.transport.connection import (
    ConnectionClosed,
    ConnectionLost,
    Handler,
)
from fedseg.federation.transport.tls import Revocations, peer_site

__all__ = ["WebSocketClient", "WebSocketConnection", "WebSocketServer"]

log = logging.getLogger("fedseg.server")

_CLOSED_AFTER_HANDSHAKE = (
    "the server closed the connection right after the TLS handshake; under TLS 1.3 that is how "
    "it refuses a site certificate (another study's, revoked, or not valid on the server's clock), "
    "and the server's log names the reason"
)


def _close_reason(text: str) -> str:
    """A WebSocket close reason must fit in 123 bytes of UTF-8."""
    return text.encode("utf-8")[:120].decode("utf-8", "ignore")


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc``, if any (not worth retrying: certificates do not fix themselves)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _closed(exc: websockets.ConnectionClosed) -> ConnectionClosed:
    received = exc.rcvd
    code, reason = (received.code, received.reason) if received is not None else (None, "")
    return ConnectionClosed(code, reason, detail=str(exc), clean=isinstance(exc, ConnectionClosedOK))


class WebSocketConnection:
    """A websockets connection (either side) as a :class:`~fedseg.federation.transport.connection.Connection`."""

    def __init__(self, ws: ServerConnection | ClientConnection, revocations: Revocations | None = None) -> None:
        self._ws = ws
        self._revocations = revocations

    @property
    def remote_address(self) -> str:
        return str(self._ws.remote_address)

    def peer_site(self, allowed: frozenset[str]) -> str:
        ssl_object = self._ws.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            raise UnknownSite("plain connections are refused; connect with wss:// and a site certificate")
        try:
            return peer_site(ssl_object, allowed, self._revocations)
        except FedsegError as exc:
            raise UnknownSite(str(exc)) from exc

    async def send(self, frame: bytes) -> None:
        try:
            await self._ws.send(frame)
        except websockets.ConnectionClosed as exc:
            raise _closed(exc) from exc

    async def recv(self, timeout: float | None = None) -> bytes | str:
        try:
            async with asyncio.timeout(timeout):
                return await self._ws.recv()
        except websockets.ConnectionClosed as exc:
            raise _closed(exc) from exc

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.close(code, _close_reason(reason))


class WebSocketServer:
    """Listen on ``host:port`` with ``ssl_context`` (mutual TLS: :func:`~fedseg.federation.transport.tls.server_context`).

    ``revocations``: certificates refused after the handshake although the CA signed them.
    """

    def __init__(
        self, host: str, port: int, ssl_context: ssl.SSLContext, revocations: Revocations | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.revocations = revocations

    @asynccontextmanager
    async def serve(self, handler: Handler) -> AsyncIterator[None]:
        async def on_connection(ws: ServerConnection) -> None:
            await handler(WebSocketConnection(ws, self.revocations))

        async with serve(
            on_connection,
            self.host,
            self.port,
            ssl=self.ssl_context,
            max_size=DEFAULT_MAX_FRAME,
            compression=None,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S,
            open_timeout=OPEN_TIMEOUT_S,  # the WebSocket upgrade after TLS
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S,  # passed to create_server: stalled ClientHellos dropped
        ):
            log.info("listening on %s:%d", self.host, self.port)
            yield


class WebSocketClient:
    """Connect to ``url`` (``wss://HOST:PORT``) with ``ssl_context`` (:func:`~fedseg.federation.transport.tls.client_context`)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext) -> None:
        if not url.startswith("wss://"):
            raise FedsegError(f"server URL {url!r} must start with wss:// (the study requires mutual TLS)")
        self.url = url
        self.ssl_context = ssl_context

    @property
    def server(self) -> str:
        return self.url

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[WebSocketConnection]:
        try:
            ws = await connect(
                self.url,
                ssl=self.ssl_context,
                max_size=DEFAULT_MAX_FRAME,
                compression=None,
                ping_interval=PING_INTERVAL_S,
                ping_timeout=PING_TIMEOUT_S,
                open_timeout=OPEN_TIMEOUT_S,
            )
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise self._failure(exc) from exc
        async with ws:  # closes with 1011 when the body raises
            yield WebSocketConnection(ws)

    def _failure(self, exc: BaseException) -> FedsegError:
        tls = _tls_failure(exc)
        if tls is not None:
            return FedsegError(f"TLS handshake with {self.url} failed: {tls}")
        if isinstance(exc, InvalidMessage):
            return ConnectionLost(f"{exc}: {_CLOSED_AFTER_HANDSHAKE}")
        return ConnectionLost(str(exc) or type(exc).__name__)
