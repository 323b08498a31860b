"""The ``sev-snp`` backend: an AMD SEV-SNP attestation report, signed by the chip's VCEK, chained to AMD's root.

The enclave side (:class:`SnpAttester`) runs inside an SEV-SNP guest and asks the AMD Secure Processor, through
the kernel's configfs-tsm interface (:mod:`.tsm`), for an ATTESTATION_REPORT over the session's report data.
The host may hand over the VCEK certificate (and ASK, ARK) in the certificate table that comes with it; the
evidence carries them as PEM. The key server side (:func:`verify`) checks that the VCEK chains through the ASK
to an ARK the owner trusts, that the VCEK signed the report, that the report is bound to this session and
measures the expected guest, and that the guest does not allow debugging.

Layouts follow the SEV-SNP Firmware ABI Specification (ATTESTATION_REPORT structure) and the GHCB
Specification (certificate table). This module has NOT been run on SEV-SNP hardware: the tests verify
reports they build and sign themselves with a made-up ARK -> ASK -> VCEK chain.

Not checked here: the report's TCB versions against AMD's current ones or the VCEK's TCB extensions (AMD's
KDS), certificate revocation lists, the VMPL, host_data, the ID and author keys, the guest SVN, or
platform_info. Reports signed with a VLEK instead of a VCEK are not supported.
"""

from __future__ import annotations

import itertools
import struct
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import AttestationError, ConfigError
from . import tsm
from .evidence import Evidence

BACKEND = "sev-snp"
PROVIDER = "sev_guest"  # the configfs-tsm provider name of the kernel's SEV-SNP guest driver
REPORT_BYTES = 0x4A0
SIGNED_BYTES = 0x2A0  # the signature covers bytes 0x000..0x29F
ECDSA_P384_SHA384 = 1  # the report's SIGNATURE_ALGO for ECDSA P-384 with SHA-384
POLICY_DEBUG = 1 << 19  # guest policy bit 19: the hypervisor may debug (read and write) the guest

# GHCB certificate table GUIDs (stored in RFC 4122 byte order)
VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_TABLE_ENTRY = struct.Struct("<16sII")  # GUID, offset (from the table's start), length

_LAYOUT = struct.Struct(
    "<"
    "I"  # 0x000 VERSION
    "I"  # 0x004 GUEST_SVN
    "Q"  # 0x008 POLICY
    "16s"  # 0x010 FAMILY_ID
    "16s"  # 0x020 IMAGE_ID
    "I"  # 0x030 VMPL
    "I"  # 0x034 SIGNATURE_ALGO
    "Q"  # 0x038 CURRENT_TCB
    "Q"  # 0x040 PLATFORM_INFO
    "8x"  # 0x048 flags (AUTHOR_KEY_EN, MASK_CHIP_KEY, SIGNING_KEY), reserved
    "64s"  # 0x050 REPORT_DATA
    "48s"  # 0x090 MEASUREMENT
    "32s"  # 0x0C0 HOST_DATA
    "48s"  # 0x0E0 ID_KEY_DIGEST
    "48s"  # 0x110 AUTHOR_KEY_DIGEST
    "32s"  # 0x140 REPORT_ID
    "32s"  # 0x160 REPORT_ID_MA
    "Q"  # 0x180 REPORTED_TCB
    "24x"  # 0x188 reserved (CPUID family, model, stepping in report version 3 and later)
    "64s"  # 0x1A0 CHIP_ID
)
_SIGNATURE = struct.Struct("<72s72s")  # at 0x2A0: R then S, each little-endian and zero-padded


@dataclass(frozen=True)
class Report:
    """The fields of an ATTESTATION_REPORT that Tempo reads or may want to check later."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    chip_id: bytes
    signed: bytes  # bytes 0x000..0x29F: what the signature covers
    signature_r: int
    signature_s: int

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)


def parse_report(data: bytes) -> Report:
    """Parse an untrusted report; the wrong size is an AttestationError (every field sits at a fixed offset)."""
    if len(data) != REPORT_BYTES:
        raise AttestationError(f"an SEV-SNP attestation report is {REPORT_BYTES} bytes, got {len(data)}")
    r, s = _SIGNATURE.unpack_from(data, SIGNED_BYTES)
    return Report(*_LAYOUT.unpack_from(data), signed=data[:SIGNED_BYTES],
                  signature_r=int.from_bytes(r, "little"), signature_s=int.from_bytes(s, "little"))


def parse_cert_table(data: bytes) -> dict[uuid.UUID, bytes]:
    """The certificates (DER) of a GHCB certificate table, by GUID. The host wrote it: bounds are checked."""
    table: dict[uuid.UUID, bytes] = {}
    for at in range(0, len(data) - _TABLE_ENTRY.size + 1, _TABLE_ENTRY.size):
        guid, offset, length = _TABLE_ENTRY.unpack_from(data, at)
        if guid == bytes(16):  # the table ends with an all-zero entry
            return table
        if offset + length > len(data):
            raise AttestationError(f"the SEV-SNP certificate table's entry {uuid.UUID(bytes=guid)} points past its "
                                   f"end ({offset}+{length} > {len(data)} bytes)")
        table[uuid.UUID(bytes=guid)] = data[offset:offset + length]
    raise AttestationError("the SEV-SNP certificate table has no terminating all-zero entry")


class SnpAttester:
    """The enclave side: a report from the AMD Secure Processor, with the host's VCEK certificate if it has one.

    Not yet run inside a real SEV-SNP guest (see the module docstring)."""

    backend = BACKEND

    def __init__(self, *, tsm_root: Path = tsm.ROOT):
        self._root = tsm_root

    def evidence(self, report_data: bytes) -> Evidence:
        got = tsm.get_report(report_data, root=self._root)
        if got.provider != PROVIDER:
            raise ConfigError(f"the kernel's TSM provider is {got.provider!r}, not {PROVIDER!r}: this is not an "
                              "SEV-SNP guest (use the backend for this TEE)")
        report = parse_report(got.outblob)
        if report.report_data != report_data:
            raise AttestationError("the SEV-SNP report carries other report data than this guest asked for")
        body: dict[str, Any] = {"report": got.outblob.hex(), **_certificates(got.auxblob)}
        return Evidence(BACKEND, report.measurement.hex(), report_data.hex(), body)


def _certificates(auxblob: bytes | None) -> dict[str, Any]:
    """The VCEK (and ASK, ARK) from the certificate table as PEM: {} when the host supplied no VCEK."""
    table = parse_cert_table(auxblob) if auxblob else {}
    if VCEK_GUID not in table:
        return {}
    found: dict[str, Any] = {"vcek": _pem(table[VCEK_GUID], "VCEK")}
    if ASK_GUID in table:
        found["chain"] = [_pem(table[ASK_GUID], "ASK")] + ([_pem(table[ARK_GUID], "ARK")] if ARK_GUID in table else [])
    return found


def _pem(der: bytes, name: str) -> str:
    try:
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
    except ValueError:
        raise AttestationError(f"the {name} certificate in the host's certificate table is not DER") from None


# ---- the key server's side ---------------------------------------------------------------------------

def verify(evidence: Evidence, roots: list[x509.Certificate]) -> None:
    """The report is signed by a VCEK that chains to one of `roots` (AMD ARKs), is bound to this session,
    measures `evidence.measurement`, and comes from a guest that cannot be debugged."""
    try:
        raw = bytes.fromhex(str(evidence.body["report"]))
    except (KeyError, ValueError):
        raise AttestationError("sev-snp evidence needs the report as hex in body['report']") from None
    report = parse_report(raw)
    if report.signature_algo != ECDSA_P384_SHA384:
        raise AttestationError(f"the SEV-SNP report's signature algorithm is {report.signature_algo}, expected "
                               f"{ECDSA_P384_SHA384} (ECDSA P-384 with SHA-384)")
    chain = _chain(evidence.body)
    _check_chain(chain, roots)
    _check_signature(report, chain[0][1])
    if report.report_data != bytes.fromhex(evidence.report_data):
        raise AttestationError("the SEV-SNP report's report_data is not the evidence's: it answers another session")
    if report.measurement != bytes.fromhex(evidence.measurement):
        raise AttestationError(f"the SEV-SNP report measures {report.measurement.hex()}, but the evidence claims "
                               f"{evidence.measurement}")
    if report.debug:
        raise AttestationError("the SEV-SNP guest's policy allows debugging (policy bit 19): its host can read "
                               "its memory, so it gets no key")


def _chain(body: dict[str, Any]) -> list[tuple[str, x509.Certificate]]:
    """[VCEK, ASK?, ARK?] from the evidence, named for error messages."""
    vcek, rest = body.get("vcek"), body.get("chain", [])
    if not isinstance(vcek, str):
        raise AttestationError("sev-snp evidence carries no VCEK certificate (PEM in body['vcek']): the guest's "
                               "host supplied none")
    if not isinstance(rest, list) or len(rest) > 2 or not all(isinstance(pem, str) for pem in rest):
        raise AttestationError("sev-snp evidence's body['chain'] must be a list of at most two PEM certificates: "
                               "ASK, then ARK")
    return [(name, _load(name, pem)) for name, pem in zip(("VCEK", "ASK", "ARK"), [vcek, *rest], strict=False)]


def _load(name: str, pem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise AttestationError(f"the evidence's {name} certificate is not a PEM X.509 certificate") from None


def _check_chain(chain: list[tuple[str, x509.Certificate]], roots: list[x509.Certificate]) -> None:
    """Each certificate is in date and signed by the next; the last is a trusted root or signed by one."""
    now = datetime.now(timezone.utc)
    for name, cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise AttestationError(f"the {name} certificate is valid from {cert.not_valid_before_utc} to "
                                   f"{cert.not_valid_after_utc}, not now ({now})")
    for (name, cert), (issuer_name, issuer) in itertools.pairwise(chain):
        _check_issued(name, cert, issuer_name, issuer)
    name, last = chain[-1]
    key = _key_bytes(last)
    if any(_key_bytes(root) == key for root in roots):
        return
    for root in roots:
        try:
            _check_issued(name, last, "trusted root", root)
        except AttestationError:
            continue
        return
    raise AttestationError(f"the {name} certificate ({last.subject.rfc4514_string()}) neither is nor is signed by "
                           "one of the AMD root certificates this key server trusts")


def _check_issued(name: str, cert: x509.Certificate, issuer_name: str, issuer: x509.Certificate) -> None:
    """`issuer` signed `cert`, with the algorithm `cert` names (AMD: RSASSA-PSS, SHA-384, 48-byte salt)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        raise AttestationError(f"the {name} certificate's signature does not verify with the {issuer_name}'s "
                               "key") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise AttestationError(f"the {name} certificate is not issued by the {issuer_name} certificate: {e}") from None


def _key_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_signature(report: Report, vcek: x509.Certificate) -> None:
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError("the VCEK certificate's key is not an ECDSA P-384 key")
    try:
        key.verify(encode_dss_signature(report.signature_r, report.signature_s), report.signed,
                   ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError("the SEV-SNP report's signature does not verify with the VCEK's key: the report "
                               "was altered, or another chip signed it") from None
