"""Untrusted worker side: runs products on blinded operands. Imports nothing from the enclave."""

from .core import WorkerCore, default_device
from .server import serve

__all__ = ["WorkerCore", "default_device", "serve"]
