"""Framed message transport over a stream socket, counting what crosses it.

Frames are ``u64 length | codec frame``. Every transport counts messages and bytes in both
directions so benchmarks get bytes per step for free.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Protocol

from ..errors import ProtocolError, WorkerLostError, WorkerTimeoutError
from .codec import decode, encode
from .messages import Message

DEFAULT_MAX_MESSAGE_BYTES = 4 << 30


@dataclass
class TrafficStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0


class Transport(Protocol):
    """One end of a link carrying messages: a socket (:class:`SocketTransport`) or a gloo pair
    (:class:`tempo.wire.dist.PairTransport`)."""

    peer: str
    stats: TrafficStats

    def send(self, msg: Message) -> None: ...

    def recv(self, timeout: float | None = None) -> Message: ...

    def close(self) -> None: ...


class SocketTransport:
    """One end of a connected stream socket carrying codec frames."""

    def __init__(self, sock: socket.socket, *, peer: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.sock, self.peer, self.max_message_bytes = sock, peer, max_message_bytes
        self.stats = TrafficStats()

    def send(self, msg: Message) -> None:
        frame = encode(msg)
        try:
            self.sock.sendall(struct.pack("<Q", len(frame)) + frame)
        except OSError as e:
            raise WorkerLostError(f"connection to {self.peer} lost while sending: {e}") from None
        self.stats.bytes_sent += len(frame) + 8
        self.stats.messages_sent += 1

    def recv(self, timeout: float | None = None) -> Message:
        self.sock.settimeout(timeout)
        (length,) = struct.unpack("<Q", self._read_exact(8))
        if length > self.max_message_bytes:
            raise ProtocolError(f"{self.peer} announced a {length}-byte message (limit {self.max_message_bytes})")
        frame = self._read_exact(length)
        self.stats.bytes_received += length + 8
        self.stats.messages_received += 1
        return decode(frame, max_bytes=self.max_message_bytes)

    def _read_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise WorkerTimeoutError(f"{self.peer} sent nothing for {self.sock.gettimeout()} s") from None
            except OSError as e:
                raise WorkerLostError(f"connection to {self.peer} lost: {e}") from None
            if k == 0:
                raise WorkerLostError(f"{self.peer} closed the connection")
            got += k
        return buf

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
