"""Every number of fedseg's protocol in one place: its version, the frame magic, size bounds and timeouts.

The parser (:mod:`~fedseg.federation.protocol.frames`, :mod:`~fedseg.federation.protocol.chunks`,
:mod:`~fedseg.federation.protocol.schemas`) enforces the sizes; the transport
shells arm the timeouts (the protocol core has no clock).
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
MAGIC = b"FSG1"

MiB = 1 << 20
# One frame: small and mid-sized models travel whole; the per-frame memory a
# peer can force on us stays bounded (received frames; see DEFAULT_SEND_FRAME for sent ones).
DEFAULT_MAX_FRAME = 64 * MiB
# What we send is cut smaller than what we accept: a frame being sent is held
# (framed, then encrypted) in the connection's buffers until the peer reads it,
# and the server sends the global model to every site at once -- with 64 MiB
# frames that was ~2 x 64 MiB per connection (~130 MB more per site at 32
# sites). 1 MiB keeps it to a few MiB per site (benchmarks/aggregation_memory.py:
# server peak at 32 sites 1.14 x that at 3, vs 1.25 x with 4 MiB and 2.65 x with
# 64 MiB); CHUNK costs 512 B per MiB (0.05 %).
DEFAULT_SEND_FRAME = 1 * MiB
# One (reassembled) message: the 38 M-parameter AH-Net in fp32 is
# 38e6 x 4 B ~ 152 MB (145 MiB) plus a small header; 1 GiB leaves room for
# fp64 weights or a network several times larger.
DEFAULT_MAX_MESSAGE = 1024 * MiB

MESSAGE_OVERHEAD = 16 * MiB  # room above the model's own bytes for headers and framing


MAX_MODEL_MESSAGE = 8 * 1024 * MiB  # no model message above 8 GiB, whatever the model (2 G float32 parameters)


def message_limit(model_bytes: int) -> int:
    """The largest message worth accepting when the largest legitimate message is ``model_bytes`` big (an UPDATE,
    MODEL or masked update, plus headers).

    A peer cannot make the reassembler hold more than that message's worth (plus
    16 MiB) per connection; :data:`DEFAULT_MAX_MESSAGE` is the limit when the model's
    size is not known, :data:`MAX_MODEL_MESSAGE` the most for any model.
    """
    return min(MAX_MODEL_MESSAGE, int(model_bytes) + MESSAGE_OVERHEAD)


MAX_HEADER = 1 * MiB  # JSON header of one frame
MAX_TENSOR_HEADER = 16 * MiB  # safetensors' own JSON header
MAX_TENSORS = 16_384
MAX_NAME = 256  # site names, tensor names, dict keys
MAX_TEXT = 4096  # free text such as an error's "reason"
MAX_ITEMS = 100_000  # entries of one JSON list or object
MAX_DEPTH = 8  # nesting of free-form "config" objects
MAX_INT = 2**63 - 1
MAX_SITES = 1024  # sites named in one secure-aggregation message
SHARE_BYTES = 66  # one Shamir share: an element of GF(2^521 - 1)
SHARE_CIPHERTEXT_BYTES = 12 + 2 * SHARE_BYTES + 16  # AES-GCM nonce + (seed share, key share) + tag
CHUNK_OVERHEAD = 512  # bytes a CHUNK frame adds around its slice (~170 used)

PING_INTERVAL_S = 20.0
"""Keepalive: a ping every 20 s, answered by the peer's event loop even mid-epoch (both ends)."""
PING_TIMEOUT_S = 60.0
"""A peer that does not answer a ping within 60 s is considered gone."""
HELLO_TIMEOUT_S = 30.0
"""How long a new connection may take to send its HELLO (server side)."""
TLS_HANDSHAKE_TIMEOUT_S = 10.0
"""How long a new TCP connection may take to complete its TLS handshake (a stalled ClientHello is dropped)."""
MAX_CONNECTIONS_PER_SITE = 2
"""Open connections allowed per site of the study, plus :data:`SPARE_CONNECTIONS` (the rest is refused at once)."""
SPARE_CONNECTIONS = 8
OPEN_TIMEOUT_S = 30.0
"""How long a site waits for the server to accept its connection."""
