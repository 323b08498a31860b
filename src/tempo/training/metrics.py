"""Metrics of a run on disk: each table as JSON lines and as CSV, written row by row.

Rows are flushed as they come, so a run that crashes or is interrupted keeps what it measured.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import ConfigError

STEP_FIELDS = ("step", "epoch", "loss", "accuracy", "step_time_s", "bytes_sent", "bytes_received")
FAULT_FIELDS = ("worker", "op", "step", "kind", "detail")  # kind: lost, stalled, failed, malformed, lied
EPOCH_FIELDS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s",
                "eval_time_s")


class MetricsTable:
    """``<name>.jsonl`` and ``<name>.csv`` in `out_dir`, with fixed columns; rows also kept in memory.

    `rows` are written first: a resumed run's metrics up to its checkpoint."""

    def __init__(self, out_dir: Path, name: str, fields: Sequence[str], rows: Sequence[dict[str, Any]] = ()):
        self.fields = tuple(fields)
        self.rows: list[dict[str, Any]] = []
        self._jsonl = (out_dir / f"{name}.jsonl").open("w")
        self._csv_file = (out_dir / f"{name}.csv").open("w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.fields)
        self._csv.writeheader()
        for row in rows:
            self.add(dict(row))

    def add(self, row: dict[str, Any]) -> None:
        if set(row) != set(self.fields):
            raise ValueError(f"metrics row has columns {sorted(row)}, expected {sorted(self.fields)}")
        self.rows.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._csv.writerow(row)
        self._jsonl.flush()
        self._csv_file.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()

    def __enter__(self) -> MetricsTable:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def new_run_dir(out: Path | None, *, root: Path = Path("runs")) -> Path:
    """`out`, or ``runs/<timestamp>`` (made unique), created."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out, n = root / stamp, 1
        while out.exists():
            n += 1
            out = root / f"{stamp}-{n}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {out}: {e.strerror}; pass another --out") from None
    return out
