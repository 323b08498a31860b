"""Batched inference through the protected model: ``eval()`` under ``torch.no_grad()``.

In eval mode with no gradients the protected model offloads only forward products, keeps nothing
on the workers between calls, and verifies every result, so inference needs nothing of its own:
this module only gives it a shape (one batch in, class probabilities out) and owns its workers. A
worker that dies, stalls or lies is retired and its product rerun on another, as in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..enclave.hosting import WorkerOptions, open_workers
from ..enclave.pools import WorkerPool


@dataclass(frozen=True)
class Protection:
    """How the products are protected; the defaults are training's (``tempo train``)."""

    scheme: str = "mix"
    checks: int = 2
    offload_anchors: bool = False
    unfold_convs: bool = False


class Predictor:
    """A protected classifier: prepared inputs [N, C, H, W] in, class probabilities [N, classes] out.

    Not thread-safe: one thread owns it and its workers (``tempo serve`` has one batching thread)."""

    def __init__(self, model: nn.Module, pool: WorkerPool, protection: Protection = Protection()):
        import tempo

        self.pool = pool
        self.model = tempo.protect(model, pool, scheme=protection.scheme, checks=protection.checks,
                                   offload_anchors=protection.offload_anchors,
                                   unfold_convs=protection.unfold_convs).eval()

    @torch.no_grad()
    def probabilities(self, x: Tensor) -> Tensor:
        self.model.eval()
        return torch.softmax(self.model(x).float(), dim=1)

    @property
    def faults(self) -> list[dict]:
        """Every worker fault so far (worker, op, kind, detail); a faulty worker gets no more work."""
        return self.model.engine.faults

    @property
    def live_workers(self) -> int:
        return self.pool.size - len(self.model.engine.retired)


@contextmanager
def open_predictor(model: nn.Module, workers: WorkerOptions, protection: Protection = Protection()
                   ) -> Iterator[Predictor]:
    """Start the workers, protect `model`, and stop the workers when done."""
    with open_workers(workers) as pool:
        yield Predictor(model, pool, protection)
