"""A pool wrapper that records everything workers receive and return: the adversary's view."""

from __future__ import annotations

from torch import Tensor

from ..enclave.pools import WorkerPool
from ..wire.messages import Job, Reply, message_tensors


class RecordingPool(WorkerPool):
    """Passes jobs through to `inner` and keeps a copy of every tensor that crossed the boundary."""

    def __init__(self, inner: WorkerPool):
        super().__init__()
        self.inner = inner
        self.received: list[tuple[str, Tensor]] = []  # (field, tensor) sent to workers
        self.returned: list[tuple[str, Tensor]] = []
        self.jobs: list[str] = []  # message type of every job, in order

    @property
    def size(self) -> int:
        return self.inner.size

    def name(self, index: int) -> str:
        return self.inner.name(index)

    def submit(self, index: int, job: Job) -> None:
        self.received += [(field, t.clone()) for field, t in message_tensors(job)]
        self.jobs.append(type(job).__name__)
        self.inner.submit(index, job)

    def collect(self, index: int, *, payload_bytes: int | None = None) -> Reply:
        reply = self.inner.collect(index, payload_bytes=payload_bytes)
        self.returned += [(field, t.clone()) for field, t in message_tensors(reply)]
        self.stats = self.inner.stats
        return reply

    def close(self) -> None:
        self.inner.close()
