"""Where a protected model's workers come from: local processes (or objects), or remote hosts that join.

Shared by everything that runs a protected model from the command line (``tempo train``,
``tempo predict``, ``tempo serve``), so that `--workers`, `--in-process-workers`, `--listen`,
`--token-file` and `--worker-timeout` mean the same thing, and are checked the same way, everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .pools import DEFAULT_TIMEOUT_S, WorkerPool


@dataclass(frozen=True)
class WorkerOptions:
    """How many workers, and where they run."""

    workers: int = 2
    in_process: bool = False  # workers as objects in this process (tests, single-GPU boxes)
    listen: str | None = None  # HOST:PORT where remote workers join (None: local workers)
    token_file: Path | None = None  # the job's secret token, which remote workers must prove
    timeout: float = DEFAULT_TIMEOUT_S  # seconds to wait for a worker's reply

    def describe(self) -> str:
        if self.listen is not None:
            return f"{self.workers} remote (joining on {self.listen})"
        return f"{self.workers} {'in-process' if self.in_process else 'process'}"


def open_workers(options: WorkerOptions, *, record: Path | None = None, record_steps: int | None = None,
                 record_until: int | None = None) -> WorkerPool:
    """The pool: remote workers joining on ``options.listen``, else local ones (recording with `record`)."""
    import tempo

    if options.listen is not None:
        if options.token_file is None:
            raise ConfigError("--listen needs --token-file: workers join only with the job's secret token")
        if record is not None:
            raise ConfigError("--record works with local workers only (it records their side)")
        return tempo.remote_workers(options.workers, listen=options.listen, token_file=options.token_file,
                                    timeout=options.timeout)
    return tempo.local_workers(options.workers, in_process=options.in_process, timeout=options.timeout,
                               record=record, record_steps=record_steps, record_until=record_until)
