"""Ground truth of a recorded run: the secrets the leakage suite scores attacks against.

Written by the enclave only when a run is recorded (``tempo train --record``), to a folder kept
apart from the workers' transcripts: per training step, the plaintext parameters the step
started from, its inputs and labels, and the key of every op invocation by its handle (the id
the worker saw). This file holds everything blinding protects: never write it in production.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..wire.transcript import StepWindow


class GroundTruth:
    """Collects one step at a time and writes ``step-NNNNNN.pt``; keeps only the last `keep_steps`
    up to step `until` (the same window as the workers' :class:`~tempo.worker.recorder.RecordingCore`)."""

    def __init__(self, directory: Path, *, keep_steps: int | None = None, until: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.window = StepWindow(keep_steps, until)
        self._current: dict[str, Any] | None = None
        warnings.warn(f"tempo: recording ground truth (plaintext weights, inputs, keys) to {self.directory}: "
                      "for leakage evaluation only", stacklevel=2)

    def begin_step(self, step: int, params: dict[str, Tensor], inputs: Tensor, labels: Tensor) -> None:
        self.flush()
        if self.window.begin(step, self.directory, ".pt"):
            self._current = {"step": step, "params": {k: v.detach().clone() for k, v in params.items()},
                             "inputs": inputs.detach().clone(), "labels": labels.detach().clone(), "ops": {}}

    def op(self, step: int, handle: int, name: str, kind: str, key: dict[str, Tensor]) -> None:
        """The key of one op invocation, under the handle its worker saw."""
        if self._current is not None and self._current["step"] == step:
            self._current["ops"][handle] = {"name": name, "kind": kind, "key": key}

    def flush(self) -> None:
        if self._current is not None:
            torch.save(self._current, self.directory / f"step-{self._current['step']:06d}.pt")
            self._current = None
