"""Tempo: confidential training on untrusted GPUs.

Public surface::

    import tempo
    with tempo.local_workers(2) as workers:
        model = tempo.protect(model, workers, scheme="mix", checks=2)

Names load lazily (PEP 562) so that ``import tempo.worker`` on a worker host pulls in nothing
from the enclave side.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "protect": "tempo.enclave.engine",
    "ProtectedModel": "tempo.enclave.engine",
    "local_workers": "tempo.enclave.distributed",
    "remote_workers": "tempo.enclave.distributed",
    "WorkerPool": "tempo.enclave.pools",
    "SCHEMES": "tempo.schemes",
    "TempoError": "tempo.errors",
    "IntegrityError": "tempo.errors",
    "WorkerError": "tempo.errors",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tempo' has no attribute {name!r}")
