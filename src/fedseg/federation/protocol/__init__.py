"""The federation protocol with no I/O: bytes in, validated messages and events out, and back.

No socket, no clock, no torch, no asyncio (as websockets' protocol core)::

    constants.py    every number: protocol version, frame magic, size bounds, keepalive and handshake timeouts
    errors.py       ProtocolError and its subclasses, the one ErrorCode table, error_body() for ERROR/REFUSE
    names.py        the one site-name rule (certificate identity, kit folder, HELLO "site")
    schemas.py      MessageType, each type's schema, Message (validated when built)
    frames.py       one frame: "FSG1" prefix, strict JSON header, safetensors payload; encode / decode
    chunks.py       messages larger than a frame: split / to_frames and the Reassembler
    settings.py     settings_differences: the study settings a site must share with the server
    participant.py  Participant (what a site does: train, keep_model, evaluate) and LocalUpdate
    session.py      ServerSession and SiteSession: one connection's handshake and messages as events
    rounds.py       ServerRounds: the study's rounds, quorum, deadlines and final step as actions
"""
