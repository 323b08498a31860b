"""The ``sgx`` and ``tdx`` backends: Intel DCAP ECDSA quotes, checked against an Intel root the owner gives.

- ``sgx``: quote version 3 from an SGX enclave run under Gramine (``/dev/attestation``). The measurement is
  MRENCLAVE (32 bytes), the hash of the enclave's initial code and data.
- ``tdx``: quote version 4, TEE type 0x81, from a TDX guest (Linux configfs-tsm, provider ``tdx_guest``). The
  measurement is MRTD || RTMR0 || RTMR1 || RTMR2 || RTMR3 (5 x 48 bytes): MRTD covers only the virtual firmware,
  the guest's boot chain measures the kernel, command line and application into the RTMRs, so the owner pins
  all five.

The byte layouts follow Intel's documents (SGX ECDSA Quote Library API, appendix "Quote Format", for v3; TDX
DCAP Quote Generation Library, "Quote Format", for v4). This code has NOT been run against a quote from real
hardware: it is tested on quotes built in software to those layouts, with a made-up Intel root.

What :func:`verify` proves: the PCK certificate chain leads to a root the owner trusts; the PCK key signed the
Quoting Enclave's report; that report binds the attestation key; the attestation key signed the quote; and the
quote carries the expected report data and measurement of a non-debug enclave or TD. What it does NOT check:
the platform's TCB status (TCB info collateral), certificate revocation (CRLs), the QE identity collateral
(that the QE is Intel's current one), and the PCK certificate's SGX extensions. A platform with a revoked or
out-of-date TCB therefore passes; an owner who needs those checks must add them from Intel's PCS collateral.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import AttestationError, ConfigError
from .evidence import REPORT_DATA_BYTES, Evidence

BACKEND_SGX, BACKEND_TDX = "sgx", "tdx"
HEADER_BYTES = 48
SGX_REPORT_BYTES = 384  # an SGX report body: the enclave's in a v3 quote, the QE's in both versions
TD_REPORT_BYTES = 584
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
ECDSA_P256 = 2  # attestation key type
CERT_PCK_CHAIN, CERT_QE_REPORT = 5, 6  # certification data types
GRAMINE_ATTESTATION = Path("/dev/attestation")

_SIGNATURE_BYTES = _KEY_BYTES = 64  # ECDSA P-256: r || s and x || y, 32 bytes each, big-endian


@dataclass(frozen=True)
class _Format:
    version: int
    tee_type: int
    body_bytes: int


_FORMATS = {BACKEND_SGX: _Format(3, 0x00000000, SGX_REPORT_BYTES), BACKEND_TDX: _Format(4, 0x00000081, TD_REPORT_BYTES)}


@dataclass(frozen=True)
class Quote:
    """The parts of a DCAP quote that verification uses; `signed` is header || body, what the attestation key signs."""

    backend: str
    signed: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: bytes  # PEM: PCK leaf, intermediate CA, root CA

    @property
    def body(self) -> bytes:
        return self.signed[HEADER_BYTES:]

    @property
    def report_data(self) -> bytes:
        return self.body[-REPORT_DATA_BYTES:]  # both report bodies end with it (SGX offset 320, TDX offset 520)

    @property
    def measurement(self) -> bytes:
        if self.backend == BACKEND_SGX:
            return self.body[64:96]  # MRENCLAVE
        return self.body[136:184] + self.body[328:520]  # MRTD, then RTMR0..3

    def debug_refusal(self) -> str | None:
        """Why this enclave or TD runs in debug mode (its memory readable by the host), or None."""
        if self.backend == BACKEND_SGX:
            flags = int.from_bytes(self.body[48:56], "little")  # ATTRIBUTES.FLAGS; bit 1 is DEBUG
            return f"the SGX enclave is a debug enclave (ATTRIBUTES.FLAGS {flags:#x})" if flags & 0x2 else None
        tud = self.body[120]  # TD_ATTRIBUTES bits 0-7, "TD under debug": any bit set means the TD is untrusted
        return f"the TD runs under debug (TD_ATTRIBUTES.TUD {tud:#04x})" if tud else None


class _Reader:
    """Reads a quote field by field; every short read names the field, so a malformed quote says where."""

    def __init__(self, data: bytes, what: str):
        self._data, self._what, self._at = data, what, 0

    def take(self, n: int, field: str) -> bytes:
        if len(self._data) - self._at < n:
            raise AttestationError(f"{self._what} is truncated: {field} needs {n} bytes at offset {self._at}, "
                                   f"{len(self._data) - self._at} left")
        self._at += n
        return self._data[self._at - n:self._at]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def sized(self, size: int, field: str) -> _Reader:
        return _Reader(self.take(size, field), f"{field} of {self._what}")

    def end(self) -> None:
        if self._at != len(self._data):
            raise AttestationError(f"{self._what} has {len(self._data) - self._at} unexpected bytes after "
                                   f"offset {self._at}")


def parse_quote(raw: bytes, backend: str) -> Quote:
    """Split a quote into its parts, refusing any other version, TEE, key type or layout than `backend`'s."""
    expected = _FORMATS[backend]
    quote = _Reader(raw, f"the {backend} quote")
    header = quote.take(HEADER_BYTES, "the header")
    version, key_type = int.from_bytes(header[0:2], "little"), int.from_bytes(header[2:4], "little")
    tee_type = int.from_bytes(header[4:8], "little")
    if (version, tee_type) != (expected.version, expected.tee_type):
        raise AttestationError(f"{backend} evidence needs a DCAP quote version {expected.version} with TEE type "
                               f"{expected.tee_type:#x}, got version {version} with TEE type {tee_type:#x}")
    if key_type != ECDSA_P256:
        raise AttestationError(f"the {backend} quote's attestation key type is {key_type}, expected {ECDSA_P256} "
                               "(ECDSA P-256)")
    if header[12:28] != INTEL_QE_VENDOR_ID:
        raise AttestationError(f"the {backend} quote's QE vendor is {header[12:28].hex()}, not Intel's")
    body = quote.take(expected.body_bytes, "the report body")
    signature_data = quote.sized(quote.u32("the signature data length"), "the signature data")
    quote.end()
    signature = signature_data.take(_SIGNATURE_BYTES, "the quote signature")
    attestation_key = signature_data.take(_KEY_BYTES, "the attestation key")
    if expected.version == 3:
        qe_parts = _qe_certification(signature_data)
    else:
        outer_type = signature_data.u16("the certification data type")
        if outer_type != CERT_QE_REPORT:
            raise AttestationError(f"the {backend} quote's certification data has type {outer_type}, expected "
                                   f"{CERT_QE_REPORT} (QE report certification data)")
        qe_data = signature_data.sized(signature_data.u32("the certification data size"), "the certification data")
        qe_parts = _qe_certification(qe_data)
        qe_data.end()
    signature_data.end()
    return Quote(backend, header + body, signature, attestation_key, *qe_parts)


def _qe_certification(reader: _Reader) -> tuple[bytes, bytes, bytes, bytes]:
    """QE report, its signature, QE authentication data, PCK chain: laid out alike in v3 and inside v4's type 6."""
    qe_report = reader.take(SGX_REPORT_BYTES, "the QE report")
    qe_signature = reader.take(_SIGNATURE_BYTES, "the QE report signature")
    auth_data = reader.take(reader.u16("the QE authentication data size"), "the QE authentication data")
    cert_type = reader.u16("the PCK certification data type")
    if cert_type != CERT_PCK_CHAIN:
        raise AttestationError(f"the quote's PCK certification data has type {cert_type}, expected "
                               f"{CERT_PCK_CHAIN} (PCK certificate chain)")
    chain = reader.take(reader.u32("the PCK certification data size"), "the PCK certificate chain")
    return qe_report, qe_signature, auth_data, chain


# ---- the key server's side ---------------------------------------------------------------------------

def verify(evidence: Evidence, roots: Sequence[x509.Certificate]) -> None:
    """Accept `evidence` only if its quote verifies up to one of `roots` and shows its report data and measurement.

    Not checked (see the module docstring): TCB status, CRLs, QE identity collateral.
    """
    if evidence.backend not in _FORMATS:
        raise AttestationError(f"backend {evidence.backend!r} is not a DCAP backend ({BACKEND_SGX}, {BACKEND_TDX})")
    try:
        raw = bytes.fromhex(str(evidence.body["quote"]))
    except (KeyError, ValueError):
        raise AttestationError(f"{evidence.backend} evidence needs a hex 'quote'") from None
    quote = parse_quote(raw, evidence.backend)
    pck = _pck_leaf_key(quote.pck_chain, roots)
    _check_ecdsa(pck, quote.qe_report_signature, quote.qe_report, "the QE report signature (by the PCK key)")
    qe_report_data = quote.qe_report[-REPORT_DATA_BYTES:]
    if qe_report_data != hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32):
        raise AttestationError("the QE report does not bind the quote's attestation key: its report data is not "
                               "SHA-256(attestation key || QE authentication data) followed by zeros")
    _check_ecdsa(_raw_p256(quote.attestation_key), quote.signature, quote.signed,
                 "the quote signature (by the attestation key)")
    refusal = quote.debug_refusal()
    if refusal:
        raise AttestationError(f"{refusal}: the host can read its memory, so it gets no key")
    if quote.report_data.hex() != evidence.report_data.lower():
        raise AttestationError("the quote's report data is not the evidence's: the quote was made for another "
                               "session or key")
    if quote.measurement.hex() != evidence.measurement.lower():
        raise AttestationError(f"the quote measures {quote.measurement.hex()}, but the evidence claims "
                               f"{evidence.measurement}")


def _pck_leaf_key(pem: bytes, roots: Sequence[x509.Certificate]) -> ec.EllipticCurvePublicKey:
    """The PCK leaf's public key, once leaf <- intermediate <- a trusted root verifies and every link is current."""
    try:
        chain = x509.load_pem_x509_certificates(pem.rstrip(b"\0"))  # the chain may end with a NUL terminator
    except ValueError:
        raise AttestationError("the quote's PCK certificate chain is not PEM certificates") from None
    if len(chain) != 3:
        raise AttestationError(f"the quote's PCK certificate chain has {len(chain)} certificates, expected 3 "
                               "(PCK leaf, intermediate CA, root CA)")
    leaf, intermediate, claimed_root = chain
    claimed = _public_der(claimed_root)
    root = next((r for r in roots if _public_der(r) == claimed), None)
    if root is None:
        raise AttestationError(f"the quote's PCK chain ends at {claimed_root.subject.rfc4514_string()!r}, which is "
                               f"not one of the {len(roots)} Intel root(s) this key server trusts")
    _check_issued(leaf, intermediate, "the PCK leaf certificate")
    _check_issued(intermediate, root, "the PCK intermediate CA certificate")
    try:
        is_ca = intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise AttestationError("the quote's PCK intermediate certificate is not a CA certificate")
    now = datetime.now(timezone.utc)
    for cert in (leaf, intermediate, root):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise AttestationError(f"the PCK chain certificate {cert.subject.rfc4514_string()!r} is not valid now "
                                   f"({cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})")
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise AttestationError("the PCK leaf certificate's key is not an ECDSA P-256 key")
    return key


def _public_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_issued(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise AttestationError(f"{what} is not signed by {issuer.subject.rfc4514_string()!r}") from None


def _raw_p256(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise AttestationError("the quote's attestation key is not a P-256 point") from None


def _check_ecdsa(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, what: str) -> None:
    """Quotes carry raw r || s (big-endian); `cryptography` wants DER."""
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationError(f"{what} does not verify") from None


# ---- the enclave's side ------------------------------------------------------------------------------

def _evidence(backend: str, raw: bytes, report_data: bytes) -> Evidence:
    """Evidence from a fresh quote; a quote for other report data means the platform answered the wrong request."""
    quote = parse_quote(raw, backend)
    if quote.report_data != report_data:
        raise AttestationError(f"the {backend} platform returned a quote for other report data than requested")
    return Evidence(backend, quote.measurement.hex(), report_data.hex(), {"quote": raw.hex()})


class GramineSgxAttester:
    """Quotes from inside an SGX enclave through Gramine's ``/dev/attestation``. Not run on hardware (see module)."""

    backend = BACKEND_SGX

    def __init__(self, root: Path = GRAMINE_ATTESTATION):
        self._root = root
        try:
            kind = (root / "attestation_type").read_text().strip()
        except OSError:
            raise ConfigError(f"{root} is missing: the sgx backend must run inside gramine-sgx with "
                              'sgx.remote_attestation = "dcap" in the manifest') from None
        if kind != "dcap":
            raise ConfigError(f"Gramine's attestation type is {kind!r}, the sgx backend needs DCAP: set "
                              'sgx.remote_attestation = "dcap" in the manifest')

    def evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_BYTES:
            raise ValueError(f"report data must be {REPORT_DATA_BYTES} bytes, got {len(report_data)}")
        try:
            (self._root / "user_report_data").write_bytes(report_data)
            raw = (self._root / "quote").read_bytes()
        except OSError as e:
            raise ConfigError(f"Gramine could not produce a DCAP quote ({e.strerror}): check that the host runs "
                              "the AESM service with a DCAP quote provider library and PCCS") from None
        return _evidence(BACKEND_SGX, raw, report_data)


class TdxAttester:
    """Quotes from inside a TDX guest. Not run on hardware (see module).

    `quote_source(report_data)` returns the raw v4 quote; the CLI wires it to Linux configfs-tsm with provider
    ``tdx_guest``. Taking a callable keeps this module free of the kernel interface and testable without it.
    """

    backend = BACKEND_TDX

    def __init__(self, quote_source: Callable[[bytes], bytes]):
        self._quote_source = quote_source

    def evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_BYTES:
            raise ValueError(f"report data must be {REPORT_DATA_BYTES} bytes, got {len(report_data)}")
        return _evidence(BACKEND_TDX, self._quote_source(report_data), report_data)
