"""Sealed checkpoints: what a run resumes from, written only encrypted and bound to the run and step."""

from __future__ import annotations

from pathlib import Path

from ..errors import SealError
from ..training.checkpoints import CheckpointError, CheckpointStore
from .model import CHECKPOINT, open_state, seal_state


class SealedCheckpoints(CheckpointStore):
    """Checkpoints sealed under the owner's data key; each names the bundle's run id and its step."""

    suffix = ".sealed"

    def __init__(self, folder: Path, data_key: bytes, run_id: str):
        super().__init__(folder)
        self._key, self._run_id = data_key, run_id

    def _write(self, state: dict, path: Path, step: int) -> None:
        seal_state(state, path, self._key, run_id=self._run_id, step=step, purpose=CHECKPOINT)

    def _read(self, path: Path, step: int) -> dict:
        manifest, state = open_state(path, self._key, purpose=CHECKPOINT)
        if manifest.get("run_id") != self._run_id:
            raise SealError(f"{path} belongs to run {manifest.get('run_id')}, not this run ({self._run_id})")
        if manifest.get("step") != step:
            raise CheckpointError(f"{path} was sealed at step {manifest.get('step')}, not {step}: an older "
                                  "checkpoint replayed under a newer name")
        return state
