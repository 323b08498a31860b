"""Fault injection as a real worker backend: workers that compute honestly, then lie.

Used to show that integrity checks catch each kind of lie against the real engine. A lying
worker is an ordinary :class:`~tempo.worker.WorkerCore` whose replies are altered after the
honest computation, so everything else (caching, release, wire accounting) is the real thing.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from ..enclave.pools import InProcessPool
from ..wire.messages import Job, Reply, Result
from ..worker.core import WorkerCore


class Lie(str, enum.Enum):
    PERTURB = "perturb"  # the largest-magnitude entry changed by 1e-3 relative
    ZERO_ROW = "zero_row"  # first row set to zero
    SCALE = "scale"  # whole result multiplied by 1.01
    STALE = "stale"  # the result this worker returned for the previous job of the same shape
    WRONG_SHAPE = "wrong_shape"  # last row dropped


def tell(lie: Lie, t: Tensor, stale: Tensor | None) -> Tensor:
    """The lie version of an honest result t."""
    t = t.clone()
    if lie is Lie.PERTURB:
        i = int(t.abs().argmax())
        t.view(-1)[i] *= 1 + 1e-3
    elif lie is Lie.ZERO_ROW:
        t[0] = 0
    elif lie is Lie.SCALE:
        t *= 1.01
    elif lie is Lie.STALE:
        t = stale if stale is not None else torch.zeros_like(t)
    elif lie is Lie.WRONG_SHAPE:
        t = t[:-1]
    return t


class LyingWorkerCore(WorkerCore):
    """Answers the first `honest_jobs` jobs honestly, then tells `lie` in every result tensor."""

    def __init__(self, lie: Lie, *, honest_jobs: int = 0, device: str | None = None):
        super().__init__(device)
        self.lie, self.honest_jobs = Lie(lie), honest_jobs
        self._previous: dict[tuple, Tensor] = {}
        self.lies_told = 0

    def handle(self, job: Job) -> Reply:
        reply = super().handle(job)
        if not isinstance(reply, Result):
            return reply
        self.honest_jobs -= 1
        lied = {}
        for name, t in reply.tensors.items():
            key = (name, tuple(t.shape))
            lied[name] = t if self.honest_jobs >= 0 else tell(self.lie, t, self._previous.get(key))
            self._previous[key] = t
        if self.honest_jobs < 0:
            self.lies_told += 1
        return Result(reply.job_id, lied)


def lying_workers(n: int, lie: Lie | str, *, honest_jobs: int = 0) -> InProcessPool:
    """An in-process pool of `n` workers that all lie the same way after `honest_jobs` jobs."""
    return InProcessPool(n, cores=[LyingWorkerCore(Lie(lie), honest_jobs=honest_jobs) for _ in range(n)])
