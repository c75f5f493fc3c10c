"""An in-memory transport: connections are paired asyncio queues, in one event loop, with no socket.

:class:`MemoryServer` is a :class:`~fedseg.federation.transport.connection.ServerTransport`
that hands every connection to the same handler as the websockets server
would; :meth:`MemoryServer.client` gives a site a
:class:`~fedseg.federation.transport.connection.ClientTransport` whose
connections carry that site's identity, as a verified TLS certificate would
(``None``: a peer without one). Frames arrive whole and in order; a close is
delivered after the frames sent before it. :meth:`MemoryConnection.abort`
drops a link the way a network failure does (code 1006, not clean).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fedseg.federation.protocol.errors import UnknownSite
from fedseg.federation.transport.connection import (
    ConnectionClosed,
    ConnectionLost,
    Handler,
)

__all__ = ["MemoryClient", "MemoryConnection", "MemoryServer"]

log = logging.getLogger("fedseg.server")

ABNORMAL_CLOSURE = 1006  # WebSocket's code for a link lost without a close frame
INTERNAL_ERROR = 1011


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


class MemoryConnection:
    """One end of an in-memory connection."""

    def __init__(self, identity: str | None, remote_address: str) -> None:
        self.identity = identity
        self._remote = remote_address
        self._inbox: asyncio.Queue[bytes | str | _Close] = asyncio.Queue()
        self._peer: MemoryConnection | None = None
        self._send_closed: ConnectionClosed | None = None
        self._recv_closed: ConnectionClosed | None = None

    @staticmethod
    def pair(identity: str | None, name: str) -> tuple[MemoryConnection, MemoryConnection]:
        """(client end, server end); the server end vouches that its peer is ``identity``."""
        client, server = MemoryConnection(None, "memory server"), MemoryConnection(identity, name)
        client._peer, server._peer = server, client
        return client, server

    @property
    def remote_address(self) -> str:
        return self._remote

    def peer_site(self, allowed: frozenset[str]) -> str:
        if self.identity is None:
            raise UnknownSite("plain connections are refused; connect with a site identity")
        if self.identity not in allowed:
            raise UnknownSite(f"identity {self.identity!r} is not a site of this study")
        return self.identity

    async def send(self, frame: bytes) -> None:
        if self._send_closed is not None:
            raise self._send_closed
        assert self._peer is not None
        self._peer._inbox.put_nowait(frame)

    async def recv(self, timeout: float | None = None) -> bytes | str:
        if self._recv_closed is not None:
            raise self._recv_closed
        async with asyncio.timeout(timeout):
            item = await self._inbox.get()
        if isinstance(item, _Close):
            self._recv_closed = ConnectionClosed(item.code, item.reason)
            raise self._recv_closed
        return item

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._send_closed is not None:
            return
        assert self._peer is not None
        self._send_closed = ConnectionClosed(code, reason)
        self._peer._send_closed = self._peer._send_closed or ConnectionClosed(code, reason)
        self._peer._inbox.put_nowait(_Close(code, reason))
        self._inbox.put_nowait(_Close(code, reason))  # wakes a recv of this end, after what already arrived

    async def abort(self) -> None:
        """Drop the link without a close frame, as a network failure does."""
        await self.close(ABNORMAL_CLOSURE, "")


class MemoryServer:
    """Serves in-memory connections; :meth:`client` makes each site's transport."""

    def __init__(self) -> None:
        self._handler: Handler | None = None
        self._open: set[MemoryConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._numbers = itertools.count(1)

    def client(self, identity: str | None) -> MemoryClient:
        """A transport for the site ``identity`` (None: a peer with no certificate)."""
        return MemoryClient(self, identity)

    @asynccontextmanager
    async def serve(self, handler: Handler) -> AsyncIterator[None]:
        self._handler = handler
        try:
            yield
        finally:
            self._handler = None
            for connection in list(self._open):
                await connection.close(1001, "server shutting down")
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def accept(self, identity: str | None) -> MemoryConnection:
        """Open a connection for ``identity``: the handler runs on the server end; the client end is returned.

        Raises:
            ConnectionLost: nothing is being served right now.
        """
        if self._handler is None:
            raise ConnectionLost("no in-memory server is listening")
        client, server = MemoryConnection.pair(identity, f"memory peer {next(self._numbers)} ({identity})")
        self._open.add(server)
        task = asyncio.get_running_loop().create_task(self._run(self._handler, server))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return client

    async def _run(self, handler: Handler, connection: MemoryConnection) -> None:
        """As websockets does: close 1000 when the handler returns, 1011 (and log) when it fails."""
        try:
            await handler(connection)
        except Exception:
            log.exception("connection handler failed")
            await connection.close(INTERNAL_ERROR, "")
        finally:
            await connection.close()
            self._open.discard(connection)


class MemoryClient:
    """A site's way to its :class:`MemoryServer`."""

    def __init__(self, server: MemoryServer, identity: str | None) -> None:
        self._server = server
        self.identity = identity

    @property
    def server(self) -> str:
        return "memory://server"

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[MemoryConnection]:
        connection = self._server.accept(self.identity)
        try:
            yield connection
        except BaseException:
            await connection.close(INTERNAL_ERROR, "")
            raise
        await connection.close()
