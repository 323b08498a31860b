"""Trusted side: interception, blinding protocol, integrity checks, keys and worker pools."""

from .engine import Engine, ProtectedModel, protect, validate_model
from .pools import InProcessPool, ProcessPool, WorkerPool, local_workers

__all__ = ["Engine", "InProcessPool", "ProcessPool", "ProtectedModel", "WorkerPool", "local_workers", "protect",
           "validate_model"]
