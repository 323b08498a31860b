"""Trusted side: interception, blinding protocol, integrity checks, keys and worker pools."""

from .distributed import DistributedPool, ProcessPool, local_workers, remote_workers
from .engine import Engine, ProtectedModel, protect, validate_model
from .pools import InProcessPool, WorkerPool

__all__ = ["DistributedPool", "Engine", "InProcessPool", "ProcessPool", "ProtectedModel", "WorkerPool", "local_workers",
           "protect", "remote_workers", "validate_model"]
