"""Sealed streams: one file of AES-256-GCM chunks that can be written and read chunk by chunk.

Layout::

    MAGIC | u32 header length | header (JSON, public) | record 0 (the manifest) | record 1 | ... | record n

Each record is ``u32 length | 12-byte random nonce | ciphertext + 16-byte tag``. Every record is
encrypted under a key derived from the owner's data key and the stream's run id and purpose
(HKDF-SHA256), and authenticated with the SHA-256 of the header, its own index and whether it is
the last record as associated data. So a flipped byte anywhere fails authentication; records
moved, swapped, dropped or taken from another stream fail it too (their index or header differ);
and a stream cut after any record lacks a record marked last, which the reader reports as
truncated. Record 0 holds the manifest (JSON: what the caller describes, plus the record count),
so a reader knows the layout before it reads the content.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, SealError

MAGIC = b"TEMPO-SEALED\x00\x01"
FORMAT = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
CHUNK_BYTES = 1 << 20  # plaintext bytes per content record
_MAX_HEADER = 1 << 16
_MAX_RECORD = 1 << 28  # refuse to allocate more for one record than any writer makes


def new_data_key() -> bytes:
    """A fresh 256-bit data key from the OS's CSPRNG: what the owner keeps."""
    return os.urandom(KEY_BYTES)


def write_key_file(path: Path, key: bytes) -> None:
    """Write `key` hex-encoded to a new file only its owner can read; never overwrite one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists: refusing to overwrite a key file (a lost key loses its data)") from None
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")


def read_key_file(path: Path) -> bytes:
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{path} is not a Tempo key file: expected {2 * KEY_BYTES} hex digits")
    return key


@dataclass(frozen=True)
class Header:
    """The public part of a sealed stream: what it is and which run it belongs to (never secret)."""

    purpose: str  # "bundle", "checkpoint", "model": a key is derived per purpose
    run_id: str  # hex; binds every record to this stream
    chunk_bytes: int = CHUNK_BYTES
    format: int = FORMAT

    def encode(self) -> bytes:
        return json.dumps({"format": self.format, "purpose": self.purpose, "run_id": self.run_id,
                           "chunk_bytes": self.chunk_bytes}, sort_keys=True).encode()


def _stream_key(data_key: bytes, header: Header) -> AESGCM:
    if len(data_key) != KEY_BYTES:
        raise ConfigError(f"a data key has {KEY_BYTES} bytes, got {len(data_key)}")
    info = f"tempo/{header.purpose}/v{header.format}".encode()
    key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=bytes.fromhex(header.run_id), info=info)
    return AESGCM(key.derive(data_key))


def _aad(header_digest: bytes, index: int, last: bool) -> bytes:
    return header_digest + struct.pack(">QB", index, last)


class SealedWriter:
    """Writes a sealed stream: the manifest first, then content records, each sealed as it is written.

    The content's record count must be known up front (it is in the manifest): pass it as `records`.
    """

    def __init__(self, out: BinaryIO, data_key: bytes, header: Header, manifest: dict, records: int):
        self._out, self._header = out, header
        self._aead = _stream_key(data_key, header)
        encoded = header.encode()
        self._digest = hashlib.sha256(encoded).digest()
        self._total, self._index = records + 1, 0
        out.write(MAGIC + struct.pack(">I", len(encoded)) + encoded)
        self.write(json.dumps(dict(manifest, records=records)).encode())

    def write(self, plaintext: bytes) -> None:
        if self._index >= self._total:
            raise SealError(f"the manifest announced {self._total - 1} content records; this is one more")
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, _aad(self._digest, self._index, self._index == self._total - 1))
        self._out.write(struct.pack(">I", NONCE_BYTES + len(sealed)) + nonce + sealed)
        self._index += 1

    def close(self) -> None:
        if self._index != self._total:
            raise SealError(f"wrote {self._index - 1} of the {self._total - 1} content records the manifest announced")


class SealedReader:
    """Reads and authenticates a sealed stream record by record; raises SealError naming what is wrong."""

    def __init__(self, source: BinaryIO, data_key: bytes, *, name: str, purpose: str):
        self._in, self.name = source, name
        if source.read(len(MAGIC)) != MAGIC:
            raise SealError(f"{name} is not a sealed Tempo file (bad magic)")
        (length,) = struct.unpack(">I", self._exactly(4, "header length"))
        if length > _MAX_HEADER:
            raise SealError(f"{name}: header of {length} bytes is implausible: the file is corrupt")
        raw = self._exactly(length, "header")
        try:
            fields = json.loads(raw)
            self.header = Header(fields["purpose"], fields["run_id"], int(fields["chunk_bytes"]), int(fields["format"]))
            bytes.fromhex(self.header.run_id)
        except (ValueError, KeyError, TypeError):
            raise SealError(f"{name}: the header is not valid: the file is corrupt") from None
        if self.header.format != FORMAT:
            raise SealError(f"{name} has format {self.header.format}; this Tempo reads format {FORMAT}")
        if self.header.purpose != purpose:
            raise SealError(f"{name} is a sealed {self.header.purpose}, not a {purpose}")
        if raw != self.header.encode():
            raise SealError(f"{name}: the header is not in canonical form: it was altered")
        self._aead = _stream_key(data_key, self.header)
        self._digest = hashlib.sha256(raw).digest()
        self._index, self._last_seen = 0, False
        try:
            self.manifest = json.loads(self._record(last=None))
            self.records = int(self.manifest["records"])
        except (ValueError, KeyError, TypeError):
            raise SealError(f"{name}: the manifest is not valid JSON with a record count") from None

    def _exactly(self, n: int, what: str) -> bytes:
        data = self._in.read(n)
        if len(data) != n:
            raise SealError(f"{self.name} is truncated: it ends inside the {what}")
        return data

    def _record(self, last: bool | None) -> bytes:
        """The next record's plaintext; `last` None: it is the last one only if the manifest says so
        (record 0, read before the count is known: both flags are tried)."""
        head = self._in.read(4)
        if not head:
            raise SealError(f"{self.name} is truncated: it ends after record {self._index - 1} of its records")
        (length,) = struct.unpack(">I", head if len(head) == 4 else head.ljust(4, b"\0"))
        if len(head) != 4 or not NONCE_BYTES + TAG_BYTES <= length <= _MAX_RECORD:
            raise SealError(f"{self.name}: record {self._index} has an impossible length: the file is corrupt")
        body = self._exactly(length, f"record {self._index}")
        nonce, sealed = body[:NONCE_BYTES], body[NONCE_BYTES:]
        for flag in ((False, True) if last is None else (last,)):
            try:
                plain = self._aead.decrypt(nonce, sealed, _aad(self._digest, self._index, flag))
            except InvalidTag:
                continue
            self._index += 1
            self._last_seen = flag
            return plain
        raise SealError(f"{self.name}: record {self._index} fails authentication: wrong key, or the file was "
                        "altered, reordered or spliced")

    def __iter__(self) -> Iterator[bytes]:
        """The content records in order, each authenticated before it is yielded; the end is checked too."""
        if self._last_seen and self.records:
            raise SealError(f"{self.name}: the manifest is marked last but announces {self.records} records")
        for i in range(self.records):
            yield self._record(last=i == self.records - 1)
        if self.records == 0 and not self._last_seen:
            raise SealError(f"{self.name}: the manifest announces no records but is not marked last")
        if self._in.read(1):
            raise SealError(f"{self.name} has bytes after its last record: the file was altered")


@contextmanager
def atomic_output(out: Path) -> Iterator[BinaryIO]:
    """A file for `out`, written under a temporary name and renamed (after fsync) only when the block
    completes: a crash or an error never leaves a half-written sealed file under the real name."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    try:
        with partial.open("wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)


def new_run_id() -> str:
    return os.urandom(16).hex()


def purpose_of(path: Path) -> str:
    """The purpose a sealed file's public header declares ("bundle", "model", ...), read without the key."""
    try:
        with Path(path).open("rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise SealError(f"{path} is not a sealed Tempo file (bad magic)")
            (length,) = struct.unpack(">I", f.read(4).rjust(4, b"\0"))
            return str(json.loads(f.read(min(length, _MAX_HEADER)))["purpose"])
    except OSError as e:
        raise ConfigError(f"cannot open {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise SealError(f"{path}: the header is not valid: the file is corrupt") from None
