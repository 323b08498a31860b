"""Sealed checkpoints: what a run resumes from, written only encrypted and bound to the run and step."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..attestation.ledger import LedgerClient, file_digest
from ..errors import AttestationError, SealError
from ..training.checkpoints import CheckpointError, CheckpointStore
from .model import CHECKPOINT, open_state, seal_state


class SealedCheckpoints(CheckpointStore):
    """Checkpoints sealed under the owner's data key; each names the bundle's run id and its step.

    With a `ledger` (the owner's key server), every checkpoint is recorded there, and a resumed run
    refuses to start from one older than the newest recorded unless the user names that step."""

    suffix = ".sealed"

    def __init__(self, folder: Path, data_key: bytes, run_id: str, ledger: LedgerClient | None = None):
        super().__init__(folder)
        self._key, self._run_id, self._ledger = data_key, run_id, ledger

    def save(self, state: dict, step: int) -> Path:
        path = super().save(state, step)
        if self._ledger is not None:
            try:
                self._ledger.record(step, file_digest(path))
            except AttestationError as e:
                warnings.warn(f"tempo: checkpoint step {step} was not recorded with the key server ({e}); a "
                              "rollback to before it would go unnoticed", stacklevel=2)
        return path

    def resume(self, step: int | None = None) -> dict:
        state = super().resume(step)
        if self._ledger is None:
            return state
        try:
            newest = self._ledger.latest()
        except AttestationError as e:
            raise CheckpointError(f"cannot confirm the newest checkpoint with the key server: {e}") from None
        chosen = state["step"]
        if newest is not None and step is None and newest.step > chosen:
            raise CheckpointError(f"the key server recorded a checkpoint of step {newest.step}, but the newest here is "
                                  f"step {chosen}: newer checkpoints were deleted or withheld (a rollback); pass "
                                  f"--resume-step {chosen} to resume from it anyway")
        if newest is not None and newest.step == chosen and newest.digest != file_digest(self.path(chosen)):
            raise CheckpointError(f"the checkpoint of step {chosen} is not the one the key server recorded")
        return state

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
