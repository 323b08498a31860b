"""A client for the Linux kernel's configfs-tsm report interface (``Documentation/ABI/testing/configfs-tsm``).

Inside a TDX or SEV-SNP guest the kernel turns 64 bytes of report data into a signed report: make an entry
under ``/sys/kernel/config/tsm/report/``, write the data to its ``inblob``, read the report from ``outblob``
(and, for SEV-SNP, the host's certificate table from ``auxblob``). ``provider`` names the format
("sev_guest", "tdx_guest"). ``generation`` counts the writes to the entry, so a reader that sees a count
other than its own writes knows another process wrote in between and the report may answer *their* data.

This follows the documented ABI but has NOT been run on TDX or SEV-SNP hardware; the tests run it against
a folder of plain files that imitates the interface.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import AttestationError, ConfigError
from .evidence import REPORT_DATA_BYTES

ROOT = Path("/sys/kernel/config/tsm/report")


@dataclass(frozen=True)
class TsmReport:
    provider: str  # the report's format: "sev_guest", "tdx_guest", ...
    outblob: bytes  # the report or quote
    auxblob: bytes | None  # provider-specific extra data (SEV-SNP: the certificate table); None when absent


def get_report(report_data: bytes, *, root: Path = ROOT, name: str | None = None) -> TsmReport:
    """Ask the TSM for a report over `report_data` (64 bytes).

    Without `name`, a fresh entry with a random name is made and removed afterwards. With `name`, that entry
    is used, made if missing; an entry that existed before is left in place. Sharing an entry is safe: the
    generation check refuses a report another writer raced. A pre-made entry is also how tests substitute a
    folder of plain files for the kernel (which creates an entry's attribute files itself on mkdir).
    """
    if len(report_data) != REPORT_DATA_BYTES:
        raise ValueError(f"report data must be {REPORT_DATA_BYTES} bytes, got {len(report_data)}")
    if not root.is_dir():
        raise ConfigError(f"{root} does not exist: attestation needs the kernel's configfs-tsm report interface "
                          "(CONFIG_TSM_REPORTS, configfs mounted at /sys/kernel/config) inside a TDX or SEV-SNP guest")
    entry = root / (name or f"tempo-{os.getpid()}-{secrets.token_hex(8)}")
    made = _make(entry)
    try:
        return _report(entry, report_data)
    finally:
        if made:
            with contextlib.suppress(OSError):  # a leftover entry holds only this report; never mask an error
                entry.rmdir()


def _make(entry: Path) -> bool:
    """Create `entry` unless it exists; True if this call made it (and so must remove it)."""
    try:
        entry.mkdir()
    except FileExistsError:
        return False
    except OSError as e:
        raise ConfigError(f"cannot create the TSM report entry {entry}: {e.strerror} (it needs root, and a "
                          "TDX or SEV-SNP guest whose kernel registered a TSM provider)") from None
    return True


def _report(entry: Path, report_data: bytes) -> TsmReport:
    before = _generation(entry)
    _write(entry / "inblob", report_data)
    outblob = _read(entry / "outblob")
    auxblob = _read(entry / "auxblob") if (entry / "auxblob").exists() else None
    provider = _read(entry / "provider").decode(errors="replace").strip()
    after = _generation(entry)
    if after != before + 1:
        raise AttestationError(f"another process wrote to the TSM report entry {entry} while this one used it "
                               f"(generation went from {before} to {after}, expected {before + 1}): the report "
                               "may be for someone else's data; try again")
    if not outblob:
        raise AttestationError(f"the TSM provider {provider!r} returned an empty report from {entry / 'outblob'}")
    return TsmReport(provider, outblob, auxblob or None)


def _generation(entry: Path) -> int:
    text = _read(entry / "generation").decode(errors="replace").strip()
    if not text.isdigit():
        raise AttestationError(f"{entry / 'generation'} holds {text!r}, not a count")
    return int(text)


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise AttestationError(f"cannot write {path}: {e.strerror}") from None


def _read(path: Path) -> bytes:
    """Read one attribute; reading outblob is what makes the kernel ask the TEE, so its errors land here."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise AttestationError(f"cannot read {path}: {e.strerror}") from None
