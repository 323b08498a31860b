"""Test infrastructure that runs against the real engine: lying workers, recording pools."""

from .faults import Lie, LyingWorkerCore, lying_workers
from .recording import RecordingPool

__all__ = ["Lie", "LyingWorkerCore", "RecordingPool", "lying_workers"]
