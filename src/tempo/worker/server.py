"""The worker's serving loop over a transport."""

from __future__ import annotations

import logging

from ..errors import ProtocolError
from ..wire.messages import BackwardJob, Failure, ForwardJob, Install, Shutdown, Update
from ..wire.transport import Transport
from .core import WorkerCore

log = logging.getLogger("tempo.worker")


def serve(transport: Transport, core: WorkerCore, *, idle_timeout: float | None = None) -> None:
    """Answer jobs until Shutdown, the enclave hangs up, or (with `idle_timeout`) it sends nothing for that
    long, which raises WorkerTimeoutError."""
    log.info("worker serving on %s (device %s)", transport.peer, core.device)
    while True:
        try:
            msg = transport.recv(timeout=idle_timeout)
        except ProtocolError as e:
            log.error("rejected a malformed message: %s", e)
            transport.send(Failure(-1, f"malformed message: {e}"))
            continue
        if isinstance(msg, Shutdown):
            return
        if not isinstance(msg, ForwardJob | BackwardJob | Install | Update):
            transport.send(Failure(-1, f"workers accept only jobs, got {type(msg).__name__}"))
            continue
        transport.send(core.handle(msg))
