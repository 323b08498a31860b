"""What a link between the enclave and a worker offers: messages both ways, counted.

Every transport counts messages and bytes in both directions so benchmarks get bytes per step
for free. The one transport is :class:`tempo.wire.dist.PairTransport` (torch.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .messages import Message

DEFAULT_MAX_MESSAGE_BYTES = 4 << 30


@dataclass
class TrafficStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0


class Transport(Protocol):
    """One end of a link carrying messages."""

    peer: str
    stats: TrafficStats

    def send(self, msg: Message) -> None: ...

    def recv(self, timeout: float | None = None, *, payload_bytes: int | None = None) -> Message:
        """The next message. `payload_bytes`: a reply that may carry at most that many tensor bytes (its
        length is checked against that, plus a small header, before anything is allocated)."""

    def close(self) -> None: ...
