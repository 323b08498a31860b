"""Worker pools on one machine: in-process (no transport) and separate worker processes.

A pool only moves jobs and replies and counts the bytes; it trusts nothing it receives (the
protocol validates every reply). Both backends run the same :class:`~tempo.worker.WorkerCore`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError, WorkerLostError, WorkerTimeoutError
from ..wire.messages import Job, Reply, Shutdown, message_tensors
from ..wire.transport import SocketTransport, TrafficStats, Transport
from ..worker.core import WorkerCore
from ..worker.recorder import RecordingCore

DEFAULT_TIMEOUT_S = 600.0


def tensor_bytes(msg: Job | Reply) -> int:
    """Payload bytes of a message's tensors (what an in-process 'wire' would carry)."""
    return sum(t.numel() * t.element_size() for _, t in message_tensors(msg))


def summed_stats(links: list) -> TrafficStats:
    """The traffic of all of a pool's links (each a transport with ``stats``)."""
    return TrafficStats(*(sum(getattr(link.stats, f) for link in links)
                          for f in ("bytes_sent", "bytes_received", "messages_sent", "messages_received")))


class WorkerPool(ABC):
    """A fixed set of workers addressed by index."""

    def __init__(self) -> None:
        self.stats = TrafficStats()

    @property
    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def name(self, index: int) -> str: ...

    @abstractmethod
    def submit(self, index: int, job: Job) -> None:
        """Send one job to worker `index` without waiting for its reply."""

    @abstractmethod
    def collect(self, index: int) -> Reply:
        """Wait for worker `index`'s reply to the oldest of its jobs not yet collected."""

    def call(self, index: int, job: Job) -> Reply:
        """Send one job to worker `index` and wait for its reply."""
        self.submit(index, job)
        return self.collect(index)

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
        self._replies: dict[int, deque[Reply]] = defaultdict(deque)

    @property
    def size(self) -> int:
        return len(self.cores)

    def name(self, index: int) -> str:
        return f"inproc-{index}"

    def submit(self, index: int, job: Job) -> None:
        """Runs the job at once (there is nothing to overlap with in one thread)."""
        self.stats.bytes_sent += tensor_bytes(job)
        self.stats.messages_sent += 1
        self._replies[index].append(self.cores[index].handle(job))

    def collect(self, index: int) -> Reply:
        reply = self._replies[index].popleft()
        self.stats.bytes_received += tensor_bytes(reply)
        self.stats.messages_received += 1
        return reply

    def close(self) -> None:
        self.cores = []


class LinkPool(WorkerPool):
    """Workers reached over one transport each, a reply awaited for at most `timeout` seconds."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout
        self._links: list[Transport] = []

    @property
    def size(self) -> int:
        return len(self._links)

    def name(self, index: int) -> str:
        return self._links[index].peer

    def submit(self, index: int, job: Job) -> None:
        with self._link_errors(index):
            self._links[index].send(job)

    def collect(self, index: int) -> Reply:
        with self._link_errors(index):
            return self._links[index].recv(timeout=self.timeout)

    @contextmanager
    def _link_errors(self, index: int) -> Iterator[None]:
        """Add what is known about a lost or silent worker to the error; keep the traffic counters current."""
        try:
            yield
        except WorkerLostError as e:
            raise WorkerLostError(f"{e}{self._lost_detail(index)}") from None
        except WorkerTimeoutError as e:
            raise WorkerTimeoutError(f"{e} (timeout {self.timeout} s)") from None
        finally:
            self.stats = summed_stats(self._links)

    def _lost_detail(self, index: int) -> str:
        """What else is known about a lost worker (appended to the error)."""
        return ""


class ProcessPool(LinkPool):
    """Each worker is a separate `python -m tempo.worker` process joined by a socket pair."""

    def __init__(self, n: int, *, timeout: float = DEFAULT_TIMEOUT_S, device: str | None = None,
                 record: Path | None = None, record_steps: int | None = None,
                 record_until: int | None = None):
        super().__init__(timeout)
        self._procs: list[subprocess.Popen] = []
        try:
            for i in range(n):
                extra = ["--device", device] if device else []
                if record is not None:
                    extra += ["--record", str(record / f"worker-{i}")]
                    extra += ["--record-steps", str(record_steps)] if record_steps else []
                    extra += ["--record-until", str(record_until)] if record_until else []
                self._spawn(i, extra)
        except BaseException:
            self.close()
            raise

    def _spawn(self, i: int, extra: list[str]) -> None:
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "tempo.worker", "--fd", str(theirs.fileno()), "--name", f"worker-{i}", *extra]
        # PASSIVE: idle OpenMP threads sleep instead of spinning, so the enclave and the workers
        # sharing cores do not starve each other. A new session keeps Ctrl-C for the enclave alone.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=env, start_new_session=True)
        theirs.close()
        self._procs.append(proc)
        self._links.append(SocketTransport(ours, peer=f"worker-{i} (pid {proc.pid})"))

    def _lost_detail(self, index: int) -> str:
        code = self._procs[index].poll()
        return f"; the worker process {f'exited with code {code}' if code is not None else 'is still running'}"

    def close(self) -> None:
        for link, proc in zip(self._links, self._procs, strict=False):
            if proc.poll() is None:
                try:
                    link.send(Shutdown())
                except WorkerLostError:
                    pass
            link.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs, self._links = [], []


def local_workers(n: int = 2, *, in_process: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
                  device: str | None = None, record: Path | None = None, record_steps: int | None = None,
                  record_until: int | None = None) -> WorkerPool:
    """Start `n` workers on this machine: separate processes by default, or objects in this process.

    `record`: every worker also writes a transcript of its training traffic to ``record/worker-i``
    (the colluding adversary of the leakage suite), keeping the last `record_steps` steps up to
    step `record_until`.
    """
    if n < 1:
        raise ConfigError(f"need at least one worker, got {n}")
    if record_steps is not None and record_steps < 1:
        raise ConfigError(f"record_steps must be >= 1, got {record_steps}")
    if in_process:
        return InProcessPool(n, device=device, record=record, record_steps=record_steps,
                             record_until=record_until)
    return ProcessPool(n, timeout=timeout, device=device, record=record, record_steps=record_steps,
                       record_until=record_until)
