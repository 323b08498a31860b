"""On-disk transcripts of a worker's traffic: what it received and what it returned.

A transcript file is a sequence of ``u64 length | codec frame`` records, the same frames the
socket transport carries, so a transcript is exactly the worker's view and reads back through
the same validating decoder. A *training step* is delimited the way any worker can delimit it:
a forward job that keeps operands for a backward, arriving after a backward job, starts a step.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProtocolError
from .codec import decode, encode
from .messages import BackwardJob, ForwardJob, Job, Message

MAX_RECORD_BYTES = 4 << 30


def is_training_job(job: Job) -> bool:
    """Products of a training step; forward-only (evaluation) jobs keep nothing for a backward.

    Installs and updates of resident weights are not products: a transcript shows a resident W'
    inside each forward job that used it (see :class:`tempo.worker.recorder.RecordingCore`).
    """
    return isinstance(job, BackwardJob) or (isinstance(job, ForwardJob) and (job.keep_x or job.keep_w))


def starts_step(previous: Job | None, job: Job) -> bool:
    """Whether `job` opens a new training step, judged from the traffic alone."""
    return (isinstance(job, ForwardJob) and is_training_job(job)
            and (previous is None or isinstance(previous, BackwardJob)))


@dataclass(frozen=True)
class StepWindow:
    """Which training steps a recording keeps: the last `keep` (None: all) up to step `until` (None: the end).

    Shared by the workers' transcripts and the enclave's ground truth, so both hold the same steps.
    """

    keep: int | None = None
    until: int | None = None

    def begin(self, step: int, directory: Path, suffix: str) -> bool:
        """Step `step` starts: drop the file that falls out of the window; whether to record this step."""
        if self.until is not None and step > self.until:
            return False
        if self.keep:
            (directory / f"step-{step - self.keep:06d}{suffix}").unlink(missing_ok=True)
        return True


def append(path: Path, messages: list[Message]) -> None:
    with path.open("ab") as f:
        for msg in messages:
            frame = encode(msg)
            f.write(struct.pack("<Q", len(frame)) + frame)


def read(path: Path) -> Iterator[Message]:
    """Every message of a transcript file, in order; a truncated or corrupt file raises ProtocolError."""
    with path.open("rb") as f:
        while head := f.read(8):
            if len(head) < 8:
                raise ProtocolError(f"{path}: truncated record header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_RECORD_BYTES:
                raise ProtocolError(f"{path}: record of {length} bytes exceeds the limit")
            frame = f.read(length)
            if len(frame) < length:
                raise ProtocolError(f"{path}: truncated record ({len(frame)} of {length} bytes)")
            try:
                yield decode(frame, max_bytes=MAX_RECORD_BYTES)
            except ProtocolError as e:
                raise ProtocolError(f"{path}: {e}") from None
