"""Length-prefixed JSON messages between the enclave and the owner's key server (one TCP connection each)."""

from __future__ import annotations

import json
import socket
import struct

from ..errors import AttestationError

MAX_MESSAGE = 1 << 20  # a quote with its certificate chain is well under this


def send(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def receive(sock: socket.socket, peer: str) -> dict:
    head = exactly(sock, 4, peer)
    (length,) = struct.unpack(">I", head)
    if length > MAX_MESSAGE:
        raise AttestationError(f"{peer} sent a message of {length} bytes (limit {MAX_MESSAGE})")
    try:
        message = json.loads(exactly(sock, length, peer))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AttestationError(f"{peer} sent a message that is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise AttestationError(f"{peer} sent a message without a type")
    return message


def exactly(sock: socket.socket, n: int, peer: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise AttestationError(f"{peer} closed the connection mid-handshake")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def field(message: dict, name: str, peer: str, size: int | None = None) -> bytes:
    try:
        value = bytes.fromhex(str(message[name]))
    except (KeyError, ValueError):
        raise AttestationError(f"{peer} sent {message['type']!r} without a hex {name!r}") from None
    if size is not None and len(value) != size:
        raise AttestationError(f"{peer}'s {name!r} has {len(value)} bytes, expected {size}")
    return value
