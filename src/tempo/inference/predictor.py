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
from pathlib import Path

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
        from tempo.testing.inference_recording import InferenceRecorder, key_tapped

        self.pool = pool
        self.recorder = pool if isinstance(pool, InferenceRecorder) else None
        scheme, truth = protection.scheme, None
        if self.recorder is not None:  # the leakage suite's ground truth: every job's key; one job per op
            scheme = self.recorder.scheme = key_tapped(scheme, self.recorder.keys)
            truth = self.recorder.truth
        self.model = tempo.protect(model, pool, scheme=scheme, checks=protection.checks,
                                   offload_anchors=protection.offload_anchors,
                                   unfold_convs=protection.unfold_convs, truth=truth).eval()
        if self.recorder is not None:
            self.recorder.scope = self.model.engine.scope

    @torch.no_grad()
    def probabilities(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Class probabilities of a batch; `labels` only go to a recording's ground truth."""
        self.model.eval()
        if self.recorder is not None:
            self.recorder.begin_batch(self.model.module, x, labels)
        return torch.softmax(self.model(x).float(), dim=1)

    @property
    def faults(self) -> list[dict]:
        """Every worker fault so far (worker, op, kind, detail); a faulty worker gets no more work."""
        return self.model.engine.faults

    @property
    def live_workers(self) -> int:
        return self.pool.size - len(self.model.engine.retired)


@contextmanager
def open_predictor(model: nn.Module, workers: WorkerOptions, protection: Protection = Protection(), *,
                   record: Path | None = None) -> Iterator[Predictor]:
    """Start the workers, protect `model`, and stop the workers when done. `record`: the leakage suite's
    recording of the inference traffic goes there (evaluation only: the truth holds the plaintext)."""
    pool = open_workers(workers)
    if record is not None:
        from tempo.testing.inference_recording import InferenceRecorder

        pool = InferenceRecorder(pool, record)
    with pool:
        yield Predictor(model, pool, protection)
