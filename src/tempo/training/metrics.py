"""Metrics of a run on disk: each table as JSON lines and as CSV, written row by row.

Rows are flushed as they come, so a run that crashes or is interrupted keeps what it measured.
:class:`RunFiles` says where a run's settings and tables go: these plain files, or, for a run of
the owner's sealed bundle, one sealed file (:mod:`tempo.sealed.metrics`) that the host cannot read.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from ..errors import ConfigError

STEP_FIELDS = ("step", "epoch", "loss", "accuracy", "step_time_s", "bytes_sent", "bytes_received")
FAULT_FIELDS = ("worker", "op", "step", "kind", "detail")  # kind: lost, stalled, failed, malformed, lied
EPOCH_FIELDS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s",
                "eval_time_s")


class MetricsTable:
    """``<name>.jsonl`` and ``<name>.csv`` in `out_dir` (None: in memory only), with fixed columns; rows also
    kept in memory.

    `rows` are written first: a resumed run's metrics up to its checkpoint."""

    def __init__(self, out_dir: Path | None, name: str, fields: Sequence[str], rows: Sequence[dict[str, Any]] = ()):
        self.name, self.fields = name, tuple(fields)
        self.rows: list[dict[str, Any]] = []
        self._files: tuple[TextIO, TextIO, csv.DictWriter] | None = None
        if out_dir is not None:
            jsonl, csv_file = (out_dir / f"{name}.jsonl").open("w"), (out_dir / f"{name}.csv").open("w", newline="")
            self._files = jsonl, csv_file, csv.DictWriter(csv_file, fieldnames=self.fields)
            self._files[2].writeheader()
        for row in rows:
            self.add(dict(row))

    def add(self, row: dict[str, Any]) -> None:
        if set(row) != set(self.fields):
            raise ValueError(f"metrics row has columns {sorted(row)}, expected {sorted(self.fields)}")
        self.rows.append(row)
        if self._files is not None:
            jsonl, csv_file, writer = self._files
            jsonl.write(json.dumps(row) + "\n")
            writer.writerow(row)
            jsonl.flush()
            csv_file.flush()

    def close(self) -> None:
        if self._files is not None:
            self._files[0].close()
            self._files[1].close()

    def __enter__(self) -> MetricsTable:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RunFiles:
    """A run's settings (``config.json``) and metrics tables as plain files in its folder, written as they come."""

    confidential = False  # True: settings and metrics are the owner's secret, kept off the terminal too

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    @property
    def where(self) -> str:
        return str(self.out_dir)

    def write_config(self, config_json: str) -> None:
        (self.out_dir / "config.json").write_text(config_json + "\n")

    def read_config(self) -> dict[str, Any]:
        """The settings of the run already in the folder (a run to resume)."""
        try:
            return json.loads((self.out_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise ConfigError(f"{self.out_dir} holds no run to resume (no readable config.json)") from None

    def table(self, name: str, fields: Sequence[str], rows: Sequence[dict[str, Any]] = ()) -> MetricsTable:
        return MetricsTable(self.out_dir, name, fields, rows)

    def save(self) -> None:
        """Bring what is on disk up to date (plain tables already are, row by row)."""

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.save()


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
