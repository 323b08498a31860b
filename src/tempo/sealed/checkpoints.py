"""Sealed checkpoints: what a run resumes from, written only encrypted and bound to the run and step."""

from __future__ import annotations

from pathlib import Path

from ..attestation.ledger import Entry, LedgerClient
from ..errors import AttestationError, SealError
from ..training.checkpoints import CheckpointError, CheckpointStore
from .model import CHECKPOINT, load_state, open_payload, seal_payload, state_bytes


class SealedCheckpoints(CheckpointStore):
    """Checkpoints sealed under the owner's data key; each names the bundle's run id and its step.

    With a `ledger` (the owner's key server), every checkpoint is recorded there before the run goes on,
    and the run stops if it cannot be; a resumed run refuses to start from one older than the one
    recorded unless the user names that step, and a fresh run refuses a run id the ledger already knows."""

    suffix = ".sealed"

    def __init__(self, folder: Path, data_key: bytes, run_id: str, ledger: LedgerClient | None = None):
        super().__init__(folder)
        self._key, self._run_id, self._ledger = data_key, run_id, ledger
        self._digests: dict[int, str] = {}  # step -> SHA-256 of its file as this process wrote or read it
        self._recorded: Entry | None = None  # the ledger's entry for this run, as last confirmed

    def begin(self) -> None:
        if self._ledger is None:
            return
        try:
            recorded = self._ledger.latest()
        except AttestationError as e:
            raise AttestationError(f"cannot ask the key server for this run's checkpoints: {e}") from None
        if recorded is not None:
            raise CheckpointError(f"the key server has recorded checkpoints of run {self._run_id} up to step "
                                  f"{recorded.step}: this bundle was trained before. Continue that run with --resume "
                                  "--out ITS_FOLDER, or seal a new bundle to train again")

    def save(self, state: dict, step: int) -> Path:
        path = super().save(state, step)
        if self._ledger is not None:
            entry = Entry(step, self._digests[step])
            try:
                self._ledger.record(self._recorded, entry)
            except AttestationError as e:
                raise AttestationError(f"the checkpoint of step {step} is written ({path}) but the key server did not "
                                       f"record it ({e}). The run stops here, since a rollback to before it would go "
                                       "unnoticed; continue with --resume once the key server answers") from None
            self._recorded = entry
        return path

    def resume(self, step: int | None = None) -> dict:
        state = super().resume(step)
        if self._ledger is None:
            return state
        try:
            recorded = self._ledger.latest()
        except AttestationError as e:
            raise CheckpointError(f"cannot confirm the newest checkpoint with the key server: {e}") from None
        chosen = Entry(state["step"], self._digests[state["step"]])
        if recorded is not None and step is None and recorded.step > chosen.step:
            raise CheckpointError(f"the key server recorded a checkpoint of step {recorded.step}, but the newest here "
                                  f"is step {chosen.step}: newer checkpoints were deleted or withheld (a rollback); "
                                  f"pass --resume-step {chosen.step} to resume from it anyway")
        if recorded is not None and recorded.step == chosen.step and recorded != chosen:
            raise CheckpointError(f"the checkpoint of step {chosen.step} is not the one the key server recorded")
        if recorded != chosen:  # an older one named on purpose, or one written but not recorded before a stop
            try:
                self._ledger.record(recorded, chosen)
            except AttestationError as e:
                raise AttestationError(f"cannot record the checkpoint of step {chosen.step} to resume from: {e}"
                                       ) from None
        self._recorded = chosen
        return state

    def _write(self, state: dict, path: Path, step: int) -> None:
        self._digests[step] = seal_payload(state_bytes(state), path, self._key, purpose=CHECKPOINT,
                                           manifest={"run_id": self._run_id, "step": step})

    def _read(self, path: Path, step: int) -> dict:
        manifest, payload, digest = open_payload(path, self._key, purpose=CHECKPOINT)
        if manifest.get("run_id") != self._run_id:
            raise SealError(f"{path} belongs to run {manifest.get('run_id')}, not this run ({self._run_id})")
        if manifest.get("step") != step:
            raise CheckpointError(f"{path} was sealed at step {manifest.get('step')}, not {step}: an older "
                                  "checkpoint replayed under a newer name")
        self._digests[step] = digest
        return load_state(payload)
