"""The checkpoint ledger: the key server remembers each run's newest checkpoint, so that a cloud that
deletes the newer checkpoints cannot roll a resumed run back to an older one unnoticed.

Sealing makes each checkpoint authentic, but only something outside the cloud's control can say
which one is the newest. The ledger holds, per run id, the last checkpoint the enclave recorded
(step and SHA-256 of the sealed file). Every move is a compare-and-swap: the enclave reports the
entry it replaces and the new one, and the key server applies it only if the ledger still holds the
entry replaced. So a replayed old report changes nothing once the run has moved on, and two
processes training the same run cannot both move it.

Every message is authenticated with an HMAC under a key derived from the data key, which only the
owner's key server and the attested enclave hold, over (message kind, run id, a fresh nonce of the
enclave's, step, digest). The enclave checks that each answer is for its own nonce and names exactly
the entry it expects; anything else (no answer, a forged or replayed one, another step) is an
AttestationError, and the run stops rather than go on with a checkpoint the ledger does not know.

Messages (same framing as the key release, :mod:`.framing`)::

    enclave -> server  {"type": "checkpoint", "run_id", "nonce", "after": [step, digest] | null, "step", "digest",
                        "tag"}
    server -> enclave  {"type": "recorded", "step", "digest", "tag"}   # the run's entry now, applied or not
    enclave -> server  {"type": "latest", "run_id", "nonce"}
    server -> enclave  {"type": "latest", "step", "digest", "tag"}     # step 0, digest "": no entry
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import AttestationError, ConfigError
from .framing import field, receive, send

TYPES = ("checkpoint", "latest")  # the first message of a ledger connection
NONCE_BYTES = 32
MAX_RUN_ID = 64  # a bundle's run id is 32 hex digits
_NONE = (0, "")  # how "no entry" travels and is authenticated


@dataclass(frozen=True)
class Entry:
    step: int
    digest: str  # hex SHA-256 of the sealed checkpoint file


def ledger_key(data_key: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"tempo/checkpoint-ledger/v2").derive(data_key)


def _tag(key: bytes, *fields: object) -> str:
    """HMAC-SHA256 over the fields as a JSON list of strings: each field delimited, none can run into the next."""
    return hmac.new(key, json.dumps([str(f) for f in fields]).encode(), hashlib.sha256).hexdigest()


def _pair(entry: Entry | None) -> tuple[int, str]:
    return _NONE if entry is None else (entry.step, entry.digest)


def _entry(step: object, digest: object, what: str, *, optional: bool = False) -> Entry | None:
    """The entry (step, digest) that `what` carries, strictly typed; AttestationError if it carries none."""
    if type(step) is not int or not isinstance(digest, str):
        raise AttestationError(f"{what} has no integer step and string digest")
    if (step, digest) == _NONE and optional:
        return None
    if step < 1 or len(digest) != 64:
        raise AttestationError(f"{what} has step {step} and a digest of {len(digest)} characters (expected a step "
                               ">= 1 and a hex SHA-256)")
    return Entry(step, digest)


def _send_entry(conn: socket.socket, kind: str, key: bytes, run_id: str, nonce: str, entry: Entry | None) -> None:
    """The server's answer: the run's entry, tagged for the request's nonce."""
    step, digest = _pair(entry)
    send(conn, {"type": kind, "step": step, "digest": digest, "tag": _tag(key, kind, run_id, nonce, step, digest)})


# ---- the owner's side --------------------------------------------------------------------------------

class Ledger:
    """Each run's last recorded checkpoint, in a JSON file that is rewritten atomically on every change.

    The entry only moves forward, except to a (run id, step) in `rewinds`: the owner's consent, given
    once per rollback (``tempo keyserver --allow-rewind RUN:STEP``), since the host's operator is who
    types ``--resume-step``."""

    def __init__(self, path: Path, *, rewinds: Iterable[tuple[str, int]] = ()):
        self.path, self._lock, self._rewinds = Path(path), threading.Lock(), set(rewinds)
        try:
            raw = json.loads(self.path.read_text()) if self.path.exists() else {}
            self._entries = {run: Entry(int(e["step"]), str(e["digest"])) for run, e in raw.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{self.path} is not a checkpoint ledger (JSON of run id -> step, digest)") from None

    def latest(self, run_id: str) -> Entry | None:
        with self._lock:
            return self._entries.get(run_id)

    def record(self, run_id: str, after: Entry | None, entry: Entry) -> Entry | None:
        """Replace the run's entry by `entry` if it is still `after`; return the run's entry now. A step back is
        an AttestationError unless the owner allowed it."""
        with self._lock:
            if self._entries.get(run_id) == after:
                if after is not None and entry.step <= after.step:
                    if (run_id, entry.step) not in self._rewinds:
                        raise AttestationError(f"run {run_id} would go back from step {after.step} to step "
                                               f"{entry.step}: a rollback needs the owner's consent (`tempo keyserver "
                                               f"--allow-rewind {run_id}:{entry.step}`)")
                    self._rewinds.discard((run_id, entry.step))
                self._entries[run_id] = entry
                partial = self.path.with_name(self.path.name + ".partial")
                partial.write_text(json.dumps({r: vars(e) for r, e in self._entries.items()}, indent=1))
                partial.replace(self.path)
            return self._entries.get(run_id)


def parse_rewind(text: str) -> tuple[str, int]:
    """``RUN_ID:STEP`` (``tempo keyserver --allow-rewind``) -> (run id, step)."""
    run_id, sep, step = text.rpartition(":")
    if not sep or not run_id or not step.isdigit() or int(step) < 1:
        raise ConfigError(f"--allow-rewind is RUN_ID:STEP (the run id and the step to go back to), got {text!r}")
    return run_id, int(step)


def serve(conn: socket.socket, peer: str, first: dict, key: bytes, ledger: Ledger) -> str:
    """Answer one ledger request (`first` is its message); returns the line to log."""
    run_id = first.get("run_id")
    if not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_RUN_ID:
        raise AttestationError(f"a ledger request needs a run id of 1 to {MAX_RUN_ID} characters")
    nonce = field(first, "nonce", peer, NONCE_BYTES).hex()
    if first["type"] == "latest":
        now = ledger.latest(run_id)
        _send_entry(conn, "latest", key, run_id, nonce, now)
        return f"told {peer} run {run_id!r}'s newest checkpoint: step {_pair(now)[0]}"  # repr: escapes shown
    entry = _entry(first.get("step"), first.get("digest"), "the checkpoint report")
    after = first.get("after")
    if not (after is None or (isinstance(after, list) and len(after) == 2)):
        raise AttestationError("a checkpoint report's 'after' is the [step, digest] it replaces, or null")
    after = None if after is None else _entry(*after, "the entry a checkpoint report replaces")
    expected = _tag(key, "checkpoint", run_id, nonce, *_pair(after), *_pair(entry))
    if not hmac.compare_digest(str(first.get("tag", "")).encode(), expected.encode()):
        raise AttestationError("the checkpoint report's tag does not verify: not from the enclave of this data key")
    now = ledger.record(run_id, after, entry)
    _send_entry(conn, "recorded", key, run_id, nonce, now)
    outcome = "recorded" if now == entry else f"did not record (the ledger holds step {_pair(now)[0]})"
    return f"{outcome} checkpoint step {entry.step} of run {run_id}"


# ---- the enclave's side ------------------------------------------------------------------------------

class LedgerClient:
    """Records checkpoints with, and asks for the newest from, the key server at `address`; every answer is
    checked for this request's nonce before it is believed."""

    def __init__(self, address: str, data_key: bytes, run_id: str, *, timeout: float = 10.0):
        from .release import parse_address

        self.address, self._host_port = address, parse_address(address)
        self._key, self.run_id, self._timeout = ledger_key(data_key), run_id, timeout

    def _ask(self, request: dict, answer_type: str, tagged: tuple[object, ...] = ()) -> Entry | None:
        """Send `request` with a fresh nonce (and a tag over it and `tagged`, if any); the run's entry from the
        answer, once its tag shows it answers this very request."""
        peer = f"key server {self.address}"
        nonce = os.urandom(NONCE_BYTES).hex()
        message = dict(request, run_id=self.run_id, nonce=nonce)
        if tagged:
            message["tag"] = _tag(self._key, request["type"], self.run_id, nonce, *tagged)
        try:
            with socket.create_connection(self._host_port, timeout=self._timeout) as sock:
                send(sock, message)
                answer = receive(sock, peer)
        except OSError as e:
            raise AttestationError(f"cannot reach {peer}: {e}") from None
        if answer["type"] == "refused":
            raise AttestationError(f"{peer} refused: {answer.get('reason')}")
        if answer["type"] != answer_type:
            raise AttestationError(f"{peer} answered a {message['type']!r} request with {answer['type']!r}")
        now = _entry(answer.get("step"), answer.get("digest"), f"the {answer_type!r} answer of {peer}", optional=True)
        expected = _tag(self._key, answer_type, self.run_id, nonce, *_pair(now))
        if not hmac.compare_digest(str(answer.get("tag", "")).encode(), expected.encode()):
            raise AttestationError(f"the ledger answer from {self.address} does not verify: forged, altered, or "
                                   "replayed from another request")
        return now

    def record(self, after: Entry | None, entry: Entry) -> None:
        """Move the run's entry from `after` to `entry`; AttestationError unless the key server now holds `entry`."""
        after_pair = None if after is None else list(_pair(after))
        now = self._ask({"type": "checkpoint", "after": after_pair, "step": entry.step, "digest": entry.digest},
                        "recorded", tagged=(*_pair(after), *_pair(entry)))
        if now != entry:
            raise AttestationError(f"the key server's ledger holds step {_pair(now)[0]} for run {self.run_id}, not "
                                   f"this checkpoint of step {entry.step}: another process records checkpoints of "
                                   "this run, or the ledger was changed")

    def latest(self) -> Entry | None:
        """The run's entry in the key server's ledger (None: none), checked fresh and authentic."""
        return self._ask({"type": "latest"}, "latest")
