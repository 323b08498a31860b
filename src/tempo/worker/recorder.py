"""The curious worker: serve jobs as usual and also keep a transcript of everything seen.

This is the adversary of the leakage suite (``tempo train --record``). It changes nothing in
what the worker computes or returns. Training steps go to one file each (``step-NNNNNN.tr``);
only the last `keep_steps` are kept, so long runs do not fill the disk, and nothing after step
`until` is written (to record a window in mid-training, where weights still move). Evaluation traffic
(forward jobs that keep nothing) is not recorded. A forward job that used a resident weight (key
lifetime K > 1) is recorded with the W' the worker held, which is what it saw.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..wire import transcript
from ..wire.messages import ForwardJob, Job, Reply, Result
from .core import WorkerCore


class RecordingCore(WorkerCore):
    """A WorkerCore that appends each training job and its reply to the current step's transcript."""

    def __init__(self, directory: Path, *, keep_steps: int | None = None, until: int | None = None,
                 device: str | None = None):
        super().__init__(device)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.window = transcript.StepWindow(keep_steps, until)
        self.step = 0
        self._recording = False
        self._previous: Job | None = None

    def handle(self, job: Job) -> Reply:
        reply = super().handle(job)
        if transcript.is_training_job(job):
            if transcript.starts_step(self._previous, job):
                self.step += 1
                self._recording = self.window.begin(self.step, self.directory, ".tr")
            if self._recording:
                seen = job
                if isinstance(job, ForwardJob) and job.w is None and isinstance(reply, Result):
                    seen = dataclasses.replace(job, w=self.resident_weight(job.weight))
                transcript.append(self.directory / f"step-{self.step:06d}.tr", [seen, reply])
            self._previous = job
        return reply
