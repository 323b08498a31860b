"""Sealed models: a trained state_dict leaves the enclave only encrypted, bound to its run and step.

The manifest records the bundle's run id and the training step, authenticated with the weights, so
the owner (``tempo unseal``) knows exactly which run and step a file holds.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError, SealError
from .stream import CHUNK_BYTES, Header, SealedReader, SealedWriter, new_run_id

PURPOSE = "model"


def seal_state(state: dict[str, Tensor], out: Path, data_key: bytes, *, run_id: str, step: int) -> Path:
    """Write `state` sealed to `out` (a temporary name first, renamed when complete)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    chunks = [payload[i:i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)]
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    try:
        with partial.open("wb") as f:
            writer = SealedWriter(f, data_key, Header(PURPOSE, new_run_id()), {"run_id": run_id, "step": step,
                                                                                 "bytes": len(payload)}, len(chunks))
            for chunk in chunks:
                writer.write(chunk)
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def open_state(path: Path, data_key: bytes) -> tuple[dict, dict[str, Tensor]]:
    """(manifest: run_id and step, the state_dict) of a sealed model; SealError if anything is off."""
    try:
        f = Path(path).open("rb")
    except OSError as e:
        raise ConfigError(f"cannot open sealed model {path}: {e.strerror}") from None
    with f:
        reader = SealedReader(f, data_key, name=str(path), purpose=PURPOSE)
        payload = b"".join(reader)
    if len(payload) != reader.manifest.get("bytes"):
        raise SealError(f"{path}: {len(payload)} bytes of weights, the manifest says {reader.manifest.get('bytes')}")
    return reader.manifest, torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
