"""Sealed states: a trained model or a checkpoint leaves the enclave only encrypted, bound to its run and step.

The manifest records the bundle's run id and the training step, authenticated with the content,
so the owner (``tempo unseal``) knows which run and step a model holds, and a resuming enclave
refuses a checkpoint of another run or one replayed under a newer step's name. Models and
checkpoints are sealed under different derived keys (their purpose): one cannot pass for the other.

:func:`seal_payload` and :func:`open_payload` also give the SHA-256 of the file's bytes exactly as
this process wrote or read them, which is what the key server's checkpoint ledger records: hashing
the file again later would hash whatever the cloud put there in between.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import ConfigError, SealError
from .stream import CHUNK_BYTES, Header, SealedReader, SealedWriter, atomic_output, new_run_id

PURPOSE = "model"
CHECKPOINT = "checkpoint"


class _Digesting:
    """A file whose bytes are hashed as they are written or read."""

    def __init__(self, f: BinaryIO):
        self._f, self._sha = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        return self._f.write(data)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._sha.update(data)
        return data

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def seal_payload(payload: bytes, out: Path, data_key: bytes, *, purpose: str, manifest: dict) -> str:
    """Write `payload` sealed to `out` (under a temporary name first, renamed when complete) with `manifest`
    (plus the payload's length) in its sealed record 0; return the SHA-256 of the file as written."""
    chunks = [payload[i:i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)]
    with atomic_output(out) as f:
        digesting = _Digesting(f)
        writer = SealedWriter(digesting, data_key, Header(purpose, new_run_id()), dict(manifest, bytes=len(payload)),
                              len(chunks))
        for chunk in chunks:
            writer.write(chunk)
        writer.close()
    return digesting.hexdigest()


def open_payload(path: Path, data_key: bytes, *, purpose: str) -> tuple[dict, bytes, str]:
    """(manifest, payload, SHA-256 of the file as read) of a sealed file; SealError if anything is off."""
    try:
        f = Path(path).open("rb")
    except OSError as e:
        raise ConfigError(f"cannot open sealed {purpose} {path}: {e.strerror}") from None
    with f:
        digesting = _Digesting(f)
        reader = SealedReader(digesting, data_key, name=str(path), purpose=purpose)
        payload = b"".join(reader)
    if len(payload) != reader.manifest.get("bytes"):
        raise SealError(f"{path}: {len(payload)} bytes of content, the manifest says {reader.manifest.get('bytes')}")
    return reader.manifest, payload, digesting.hexdigest()


def state_bytes(state: dict) -> bytes:
    """`state` as ``torch.save`` writes it (loadable with ``weights_only``)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_state(payload: bytes) -> dict:
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def seal_state(state: dict, out: Path, data_key: bytes, *, run_id: str, step: int, purpose: str = PURPOSE) -> Path:
    """Write `state` (anything ``torch.save`` with ``weights_only`` loading can hold) sealed to `out`."""
    seal_payload(state_bytes(state), out, data_key, purpose=purpose, manifest={"run_id": run_id, "step": step})
    return out


def open_state(path: Path, data_key: bytes, purpose: str = PURPOSE) -> tuple[dict, dict]:
    """(manifest: run_id and step, the state) of a sealed model or checkpoint; SealError if anything is off."""
    manifest, payload, _ = open_payload(path, data_key, purpose=purpose)
    return manifest, load_state(payload)
