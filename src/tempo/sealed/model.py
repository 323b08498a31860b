"""Sealed states: a trained model or a checkpoint leaves the enclave only encrypted, bound to its run and step.

The manifest records the bundle's run id and the training step, authenticated with the content,
so the owner (``tempo unseal``) knows which run and step a model holds, and a resuming enclave
refuses a checkpoint of another run or one replayed under a newer step's name. Models and
checkpoints are sealed under different derived keys (their purpose): one cannot pass for the other.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..errors import ConfigError, SealError
from .stream import CHUNK_BYTES, Header, SealedReader, SealedWriter, atomic_output, new_run_id

PURPOSE = "model"
CHECKPOINT = "checkpoint"


def seal_state(state: dict, out: Path, data_key: bytes, *, run_id: str, step: int, purpose: str = PURPOSE) -> Path:
    """Write `state` (anything ``torch.save`` with ``weights_only`` loading can hold) sealed to `out`,
    under a temporary name first, renamed when complete."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    chunks = [payload[i:i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)]
    with atomic_output(out) as f:
        writer = SealedWriter(f, data_key, Header(purpose, new_run_id()), {"run_id": run_id, "step": step,
                                                                             "bytes": len(payload)}, len(chunks))
        for chunk in chunks:
            writer.write(chunk)
        writer.close()
    return out


def open_state(path: Path, data_key: bytes, purpose: str = PURPOSE) -> tuple[dict, dict]:
    """(manifest: run_id and step, the state) of a sealed model or checkpoint; SealError if anything is off."""
    try:
        f = Path(path).open("rb")
    except OSError as e:
        raise ConfigError(f"cannot open sealed model {path}: {e.strerror}") from None
    with f:
        reader = SealedReader(f, data_key, name=str(path), purpose=purpose)
        payload = b"".join(reader)
    if len(payload) != reader.manifest.get("bytes"):
        raise SealError(f"{path}: {len(payload)} bytes of weights, the manifest says {reader.manifest.get('bytes')}")
    return reader.manifest, torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
