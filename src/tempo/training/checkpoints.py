"""Checkpoints of a training run, and which one a resumed run starts from.

A checkpoint holds everything the rest of the run depends on: model, optimizer and schedule
states, the global RNG, the data loader's generator as it was at the start of the epoch, how many
batches of that epoch were done, and the metrics so far. A run resumed from it therefore makes the
same steps on the same batches as a run that never stopped.

Files are ``step-NNNNNNNN<suffix>`` in one folder, written under a temporary name and renamed, so a
run killed while writing leaves the previous checkpoint intact. Each file also records its own step,
and a file whose content is another step's (an older checkpoint copied over a newer one's name) is
refused. A resumed run starts from the newest file and refuses it if it is not valid, listing the
older steps: falling back to one is the user's call (``--resume-step``), not a silent one.
"""

from __future__ import annotations

import pickle
import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..errors import ConfigError, SealError

KEEP = 3  # newest checkpoints kept on disk


class CheckpointError(ConfigError):
    """No usable checkpoint to resume from: none written, or the one asked for is not valid."""


class CheckpointStore(ABC):
    """Checkpoints in `folder`, one file per step; subclasses say how a file is written and read."""

    suffix: str

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @abstractmethod
    def _write(self, state: dict, path: Path, step: int) -> None: ...

    @abstractmethod
    def _read(self, path: Path, step: int) -> dict:
        """The state in `path`; raise CheckpointError or SealError if it is not step `step`'s, valid one."""

    def begin(self) -> None:  # noqa: B027  (a hook: only stores that keep a record elsewhere need it)
        """Called before a fresh (not resumed) run's first step: a store that keeps a record elsewhere checks
        there that the run is indeed new."""

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}{self.suffix}"

    def save(self, state: dict, step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(step)
        partial = path.with_name(path.name + ".partial")
        try:
            self._write(state, partial, step)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        for old in self.steps()[:-KEEP]:
            self.path(old).unlink(missing_ok=True)
        return path

    def steps(self) -> list[int]:
        pattern = re.compile(rf"step-(\d{{8}}){re.escape(self.suffix)}")
        found = (pattern.fullmatch(p.name) for p in self.folder.glob(f"step-*{self.suffix}"))
        return sorted(int(m.group(1)) for m in found if m)

    def resume(self, step: int | None = None) -> dict:
        """The state to resume from: `step`'s, or the newest, refused if it is not valid.

        Only the newest file can be judged here: a cloud that deleted newer ones is caught only by a
        store that keeps a record elsewhere (``SealedCheckpoints`` with a ledger)."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint to resume from in {self.folder}")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.folder}; there are {steps}")
        try:
            state = self._read(self.path(chosen), chosen)
        except (CheckpointError, SealError) as e:
            older = [s for s in steps if s < chosen]
            hint = (f"; to resume from an older one, pass --resume-step with one of {older}" if older else "")
            raise CheckpointError(f"the checkpoint of step {chosen} is not valid: {e}{hint}") from None
        if state.get("step") != chosen:
            raise CheckpointError(f"{self.path(chosen)} holds step {state.get('step')}, not {chosen}: an older "
                                  "checkpoint replayed under a newer name")
        return state


class PlainCheckpoints(CheckpointStore):
    """Checkpoints as ordinary ``torch.save`` files (runs that are not sealed)."""

    suffix = ".pt"

    def _write(self, state: dict, path: Path, step: int) -> None:
        torch.save(state, path)

    def _read(self, path: Path, step: int) -> dict:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{path} is not a readable checkpoint ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} is not a checkpoint")
        return state
