"""Sealed run files: a bundle run's settings and metrics leave the enclave only as ``RUN/metrics.sealed``.

The settings the owner sealed and every loss, accuracy and fault are the owner's, not the host's:
the tables stay in enclave memory and are written, whole, as one sealed file (purpose ``metrics``,
a key of its own, bound to the bundle's run id) after every checkpoint and epoch and when the run
ends, also on an error. ``tempo unseal RUN/metrics.sealed`` gives the owner back ``config.json``
and each table as ``.jsonl`` and ``.csv``, the files a plain run writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SealError
from ..training.metrics import MetricsTable, RunFiles
from .model import open_payload, seal_payload

PURPOSE = "metrics"
NAME = "metrics.sealed"


class SealedRunFiles(RunFiles):
    """Settings and metrics tables kept in memory and written sealed under the data key to ``NAME``."""

    confidential = True

    def __init__(self, out_dir: Path, data_key: bytes, run_id: str):
        super().__init__(out_dir)
        self._key, self._run_id = data_key, run_id
        self._config: dict[str, Any] | None = None
        self._tables: dict[str, MetricsTable] = {}

    @property
    def where(self) -> str:
        return str(self.out_dir / NAME)

    def write_config(self, config_json: str) -> None:
        self._config = json.loads(config_json)

    def read_config(self) -> dict[str, Any]:
        return open_metrics(self.out_dir / NAME, self._key, self._run_id)["config"]

    def table(self, name: str, fields: Sequence[str], rows: Sequence[dict[str, Any]] = ()) -> MetricsTable:
        self._tables[name] = MetricsTable(None, name, fields, rows)
        return self._tables[name]

    def save(self) -> None:
        if self._config is None:
            return  # the run has not started: nothing of it to keep
        tables = {name: {"fields": list(t.fields), "rows": t.rows} for name, t in self._tables.items()}
        seal_payload(json.dumps({"config": self._config, "tables": tables}).encode(), self.out_dir / NAME, self._key,
                     purpose=PURPOSE, manifest={"run_id": self._run_id})


def open_metrics(path: Path, data_key: bytes, run_id: str | None = None) -> dict[str, Any]:
    """The settings and tables of a sealed metrics file (of run `run_id`, if given); SealError if anything is off."""
    manifest, payload, _ = open_payload(path, data_key, purpose=PURPOSE)
    if run_id is not None and manifest.get("run_id") != run_id:
        raise SealError(f"{path} belongs to run {manifest.get('run_id')}, not this run ({run_id})")
    try:
        content = json.loads(payload)
        tables = {str(name): (list(t["fields"]), list(t["rows"])) for name, t in content["tables"].items()}
        config = dict(content["config"])
        if not all(name.isidentifier() for name in tables):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SealError(f"{path}: the sealed metrics are not settings and tables") from None
    return {"run_id": manifest.get("run_id"), "config": config, "tables": tables}


def write_plain(metrics: dict[str, Any], dest: Path) -> None:
    """The owner's copy: ``config.json`` and each table as ``<name>.jsonl`` and ``<name>.csv`` in `dest`."""
    (dest / "config.json").write_text(json.dumps(metrics["config"], indent=2) + "\n")
    for name, (fields, rows) in metrics["tables"].items():
        MetricsTable(dest, name, fields, rows).close()
