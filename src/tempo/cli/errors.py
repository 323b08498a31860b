"""How the command line ends on an error: one line on stderr and an exit code, no traceback.

Expected failures (bad input, a lost or lying worker, Ctrl-C) are the user's to fix and read,
not ours to debug; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from ..errors import (
    AttestationError,
    ConfigError,
    DatasetError,
    IntegrityError,
    ProtocolError,
    SealError,
    TempoError,
    UnsupportedModelError,
    WorkerError,
)

EXIT_BAD_INPUT = 2
EXIT_WORKERS = 3  # a worker died, stalled, failed, spoke out of protocol or failed verification
EXIT_ATTESTATION = 4  # key release refused, or the key server could not be reached
EXIT_OTHER = 1
EXIT_INTERRUPTED = 130


def exit_code(error: TempoError) -> int:
    if isinstance(error, ConfigError | DatasetError | UnsupportedModelError | SealError):
        return EXIT_BAD_INPUT
    if isinstance(error, WorkerError | IntegrityError | ProtocolError):
        return EXIT_WORKERS
    if isinstance(error, AttestationError):
        return EXIT_ATTESTATION
    return EXIT_OTHER


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; return the Exit to raise."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn Tempo's errors and Ctrl-C inside the block into :func:`fail`."""
    try:
        yield
    except KeyboardInterrupt:
        raise fail("interrupted", EXIT_INTERRUPTED) from None
    except TempoError as e:
        raise fail(str(e), exit_code(e)) from None
