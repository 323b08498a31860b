"""The checkpoint ledger: the key server remembers each run's newest checkpoint, so that a cloud that
deletes the newer checkpoints cannot roll a resumed run back to an older one unnoticed.

Sealing makes each checkpoint authentic, but only something outside the cloud's control can say
which one is the newest. After writing a checkpoint the enclave reports (run id, step, SHA-256 of
the sealed file) to the owner's key server, which keeps the highest step per run in a JSON file and
never lowers it. A resuming enclave asks for that entry with a fresh nonce. Both directions are
authenticated with an HMAC under a key derived from the data key, which only the owner and the
attested enclave hold; the nonce makes an old answer useless.

Messages (same framing as the key release, :mod:`.framing`)::

    enclave -> server  {"type": "checkpoint", "run_id", "step", "digest", "tag"}   -> {"type": "recorded", "step"}
    enclave -> server  {"type": "latest", "run_id", "nonce"}   -> {"type": "latest", "step", "digest", "tag"}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import AttestationError, ConfigError
from .framing import field, receive, send

TYPES = ("checkpoint", "latest")  # the first message of a ledger connection


@dataclass(frozen=True)
class Entry:
    step: int
    digest: str  # hex SHA-256 of the sealed checkpoint file


def ledger_key(data_key: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"tempo/checkpoint-ledger/v1").derive(data_key)


def _tag(key: bytes, *fields: object) -> str:
    return hmac.new(key, json.dumps([str(f) for f in fields]).encode(), hashlib.sha256).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the owner's side --------------------------------------------------------------------------------

class Ledger:
    """Each run's newest checkpoint, in a JSON file that is rewritten atomically on every change."""

    def __init__(self, path: Path):
        self.path, self._lock = Path(path), threading.Lock()
        try:
            raw = json.loads(self.path.read_text()) if self.path.exists() else {}
            self._entries = {run: Entry(int(e["step"]), str(e["digest"])) for run, e in raw.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{self.path} is not a checkpoint ledger (JSON of run id -> step, digest)") from None

    def latest(self, run_id: str) -> Entry | None:
        with self._lock:
            return self._entries.get(run_id)

    def record(self, run_id: str, entry: Entry) -> Entry:
        """Keep `entry` if it is newer than the run's; return the run's newest (a replayed old report changes
        nothing)."""
        with self._lock:
            current = self._entries.get(run_id)
            if current is None or entry.step > current.step:
                self._entries[run_id] = entry
                partial = self.path.with_name(self.path.name + ".partial")
                partial.write_text(json.dumps({r: vars(e) for r, e in self._entries.items()}, indent=1))
                partial.replace(self.path)
            return self._entries[run_id]


def serve(conn: socket.socket, peer: str, first: dict, key: bytes, ledger: Ledger) -> str:
    """Answer one ledger request (`first` is its message); returns the line to log."""
    run_id = str(first.get("run_id", ""))
    if first["type"] == "checkpoint":
        try:
            entry = Entry(int(first["step"]), str(first["digest"]))
        except (KeyError, TypeError, ValueError):
            raise AttestationError("a checkpoint report needs an integer step and a digest") from None
        expected = _tag(key, "checkpoint", run_id, entry.step, entry.digest)
        if not hmac.compare_digest(str(first.get("tag", "")), expected):
            raise AttestationError("the checkpoint report's tag does not verify: not from the enclave of this data key")
        newest = ledger.record(run_id, entry)
        send(conn, {"type": "recorded", "step": newest.step})
        return f"recorded checkpoint step {entry.step} of run {run_id} (newest {newest.step})"
    nonce = field(first, "nonce", peer, 32)
    newest = ledger.latest(run_id) or Entry(0, "")
    send(conn, {"type": "latest", "step": newest.step, "digest": newest.digest,
                "tag": _tag(key, "latest", run_id, nonce.hex(), newest.step, newest.digest)})
    return f"told {peer} run {run_id}'s newest checkpoint: step {newest.step}"


# ---- the enclave's side ------------------------------------------------------------------------------

class LedgerClient:
    """Reports checkpoints to, and asks for the newest from, the key server at `address`."""

    def __init__(self, address: str, data_key: bytes, run_id: str, *, timeout: float = 10.0):
        from .release import parse_address

        self.address, self._host_port = address, parse_address(address)
        self._key, self.run_id, self._timeout = ledger_key(data_key), run_id, timeout

    def _ask(self, message: dict) -> dict:
        peer = f"key server {self.address}"
        try:
            with socket.create_connection(self._host_port, timeout=self._timeout) as sock:
                send(sock, message)
                answer = receive(sock, peer)
        except OSError as e:
            raise AttestationError(f"cannot reach {peer}: {e}") from None
        if answer["type"] == "refused":
            raise AttestationError(f"{peer} refused: {answer.get('reason')}")
        return answer

    def record(self, step: int, digest: str) -> None:
        answer = self._ask({"type": "checkpoint", "run_id": self.run_id, "step": step, "digest": digest,
                            "tag": _tag(self._key, "checkpoint", self.run_id, step, digest)})
        if answer["type"] != "recorded":
            raise AttestationError(f"key server {self.address} answered a checkpoint report with {answer['type']!r}")

    def latest(self) -> Entry | None:
        """The newest checkpoint the key server has for this run (None: none), checked fresh and authentic."""
        nonce = os.urandom(32)
        answer = self._ask({"type": "latest", "run_id": self.run_id, "nonce": nonce.hex()})
        try:
            entry = Entry(int(answer["step"]), str(answer["digest"]))
        except (KeyError, TypeError, ValueError):
            raise AttestationError(f"key server {self.address} sent a malformed ledger answer") from None
        expected = _tag(self._key, "latest", self.run_id, nonce.hex(), entry.step, entry.digest)
        if answer["type"] != "latest" or not hmac.compare_digest(str(answer.get("tag", "")), expected):
            raise AttestationError(f"the ledger answer from {self.address} does not verify: replayed or forged")
        return entry if entry.step else None
