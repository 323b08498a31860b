"""Worker pools: the interface, in-process workers (no transport) and workers behind links.

A pool only moves jobs and replies and counts the bytes; it trusts nothing it receives (the
protocol validates every reply). Every backend runs the same :class:`~tempo.worker.WorkerCore`;
pools over torch.distributed links (local processes and remote hosts) are in
:mod:`tempo.enclave.distributed`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from ..errors import WorkerLostError
from ..wire.messages import Job, Reply, message_tensors
from ..wire.transport import TrafficStats, Transport
from ..worker.core import WorkerCore
from ..worker.recorder import RecordingCore
from .pace import Pace

DEFAULT_TIMEOUT_S = 600.0


def tensor_bytes(msg: Job | Reply) -> int:
    """Payload bytes of a message's tensors (what an in-process 'wire' would carry)."""
    return sum(t.numel() * t.element_size() for _, t in message_tensors(msg))


def summed_stats(links: list) -> TrafficStats:
    """The traffic of all of a pool's links (each a transport with ``stats``)."""
    return TrafficStats(*(sum(getattr(link.stats, f) for link in links)
                          for f in ("bytes_sent", "bytes_received", "messages_sent", "messages_received")))


class WorkerPool(ABC):
    """A fixed set of workers addressed by index.

    A pool also times its workers (:meth:`reply_seconds`); `pace` keeps those times, for the protocol
    to spot a worker far slower than its peers (:mod:`tempo.enclave.pace`).
    """

    def __init__(self) -> None:
        self.stats = TrafficStats()
        self.pace = Pace()
        self._took: dict[int, float | None] = {}  # per worker: the time its last collected reply took

    @property
    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def name(self, index: int) -> str: ...

    @abstractmethod
    def submit(self, index: int, job: Job) -> None:
        """Send one job to worker `index` without waiting for its reply."""

    @abstractmethod
    def collect(self, index: int, *, payload_bytes: int | None = None) -> Reply:
        """Wait for worker `index`'s reply to the oldest of its jobs not yet collected. `payload_bytes`: the
        tensor bytes the reply may carry (what the job expects); a larger reply is refused unread."""

    def call(self, index: int, job: Job, *, payload_bytes: int | None = None) -> Reply:
        """Send one job to worker `index` and wait for its reply."""
        self.submit(index, job)
        return self.collect(index, payload_bytes=payload_bytes)

    def reply_seconds(self, index: int) -> float | None:
        """How long worker `index` took over the reply just collected from it; None when the pool cannot tell."""
        return self._took.pop(index, None)

    @abstractmethod
    def close(self) -> None:
        """Stop the workers."""

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class InProcessPool(WorkerPool):
    """Workers as objects in this process: no transport, for tests and single-GPU boxes."""

    def __init__(self, n: int, *, device: str | None = None, cores: list[WorkerCore] | None = None,
                 record: Path | None = None, record_steps: int | None = None,
                 record_until: int | None = None):
        super().__init__()
        if cores is None:
            cores = [WorkerCore(device) if record is None
                     else RecordingCore(record / f"worker-{i}", keep_steps=record_steps, until=record_until,
                                   device=device)
                     for i in range(n)]
        self.cores = cores
        self._replies: dict[int, deque[tuple[Reply, float]]] = defaultdict(deque)  # with the seconds each took

    @property
    def size(self) -> int:
        return len(self.cores)

    def name(self, index: int) -> str:
        return f"inproc-{index}"

    def submit(self, index: int, job: Job) -> None:
        """Runs the job at once (there is nothing to overlap with in one thread)."""
        self.stats.bytes_sent += tensor_bytes(job)
        self.stats.messages_sent += 1
        start = time.perf_counter()
        reply = self.cores[index].handle(job)
        self._replies[index].append((reply, time.perf_counter() - start))

    def collect(self, index: int, *, payload_bytes: int | None = None) -> Reply:
        """The reply (no wire: `payload_bytes` bounds nothing here)."""
        reply, self._took[index] = self._replies[index].popleft()
        self.stats.bytes_received += tensor_bytes(reply)
        self.stats.messages_received += 1
        return reply

    def close(self) -> None:
        self.cores = []


class LinkPool(WorkerPool):
    """Workers reached over one transport each, a reply awaited for at most `timeout` seconds.

    A reply's time runs from its job's send to its receipt. Replies are collected one worker after
    another, so one that was already waiting when its turn came took at most that long: its time
    counts only when the pool waited for at least half of it (else :meth:`reply_seconds` is None).
    """

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout
        self._links: list[Transport] = []
        self._in_flight: Counter[int] = Counter()  # jobs sent and not yet answered, per worker
        self._sent_at: dict[int, float] = {}

    @property
    def size(self) -> int:
        return len(self._links)

    def name(self, index: int) -> str:
        return self._links[index].peer

    def submit(self, index: int, job: Job) -> None:
        with self._link_errors(index):
            self._in_flight[index] += 1
            self._links[index].send(job)
            self._sent_at[index] = time.monotonic()

    def collect(self, index: int, *, payload_bytes: int | None = None) -> Reply:
        with self._link_errors(index):
            waiting = time.monotonic()
            sent = self._sent_at.pop(index, waiting)
            reply = self._links[index].recv(timeout=self.timeout, payload_bytes=payload_bytes)
            self._in_flight[index] -= 1
            done = time.monotonic()
            self._took[index] = done - sent if done - waiting >= (done - sent) / 2 else None
            return reply

    def busy(self, index: int) -> bool:
        """Whether worker `index` holds a job not yet answered: interrupted mid-round, or stalled, or dead.
        Such a link is not sent a Shutdown on close (the worker may be blocked sending its reply)."""
        return self._in_flight[index] > 0

    @contextmanager
    def _link_errors(self, index: int) -> Iterator[None]:
        """Add what is known about a lost worker to the error; keep the traffic counters current."""
        try:
            yield
        except WorkerLostError as e:
            raise WorkerLostError(f"{e}{self._lost_detail(index)}") from None
        finally:
            self.stats = summed_stats(self._links)

    def _lost_detail(self, index: int) -> str:
        """What else is known about a lost worker (appended to the error)."""
        return ""
