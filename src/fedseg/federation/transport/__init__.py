"""Network shells around the sans-I/O protocol: they pump frames, arm timers and carry out events.

::

    connection.py   the interface the pumps need: Connection, ServerTransport, ClientTransport, their errors
    websocket.py    the deployment transport: websockets over mutual TLS
    memory.py       the in-memory transport (paired asyncio queues, an identity per connection) for tests
    tls.py          ssl.SSLContext objects from kits; a peer's verified site name
    kit.py          start-up kits as read by a running server or site
    retry.py        Backoff: when a site reconnects
    server.py       serve_study / run_server: ServerSession + ServerRounds over a transport, RoundStore
    client.py       join_study / run_client: SiteSession + a Participant over a transport (no torch)
"""
