"""The key server's side of attestation: which evidence it accepts, checked against which roots of trust.

A measurement means something only for the backend that took it: a dev measurement is whatever the
holder of a dev signing key chose to sign. So every expected measurement is pinned to its backend
(``--expect sgx:<MRENCLAVE>``), and a key server trusts either hardware roots or dev keys, never both:
one that trusted both would hand the key to dev evidence claiming the hardware measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from ..errors import AttestationError, ConfigError
from . import dcap, dev, snp
from .evidence import Evidence

Expected = tuple[str, str]  # (backend, hex measurement)


@dataclass(frozen=True)
class Policy:
    """What the key server accepts: these (backend, measurement) pairs, from these backends' roots of trust."""

    measurements: frozenset[Expected]
    dev_keys: frozenset[str] = field(default_factory=frozenset)  # trusted dev signing keys (hex)
    roots: tuple[x509.Certificate, ...] = ()  # vendor roots: Intel's (sgx, tdx), AMD's ARKs (sev-snp)

    def __post_init__(self) -> None:
        if self.dev_keys and self.roots:
            raise ConfigError("give --trust-root (hardware evidence) or --dev-trust (dev evidence), not both: anyone "
                              "holding a trusted dev key can sign any measurement, the hardware ones included")
        object.__setattr__(self, "measurements", frozenset((b, m.lower()) for b, m in self.measurements))
        for backend, measurement in self.measurements:
            if backend == dev.BACKEND and not self.dev_keys:
                raise ConfigError(f"--expect {backend}:{measurement} needs --dev-trust (the dev key that signs it)")
            if backend in HARDWARE_BACKENDS and not self.roots:
                raise ConfigError(f"--expect {backend}:{measurement} needs --trust-root (the vendor root of its "
                                  "evidence)")
            if backend not in BACKENDS:
                raise ConfigError(f"--expect names backend {backend!r}; choose one of {list(BACKENDS)}")

    def check(self, evidence: Evidence) -> None:
        if evidence.backend == dev.BACKEND:
            if not self.dev_keys:
                raise AttestationError("this key server does not accept the dev backend (no --dev-trust key)")
            dev.verify(evidence, self.dev_keys)
        elif evidence.backend in HARDWARE_BACKENDS:
            if not self.roots:
                raise AttestationError(f"this key server has no vendor root (--trust-root) to check "
                                       f"{evidence.backend} evidence against")
            HARDWARE_BACKENDS[evidence.backend](evidence, list(self.roots))
        else:
            raise AttestationError(f"attestation backend {evidence.backend!r} is not supported by this key server")
        if (evidence.backend, evidence.measurement.lower()) not in self.measurements:
            raise AttestationError(f"measurement {evidence.measurement} is not the expected one for backend "
                                   f"{evidence.backend}")


HARDWARE_BACKENDS: dict[str, Callable[[Evidence, list[x509.Certificate]], None]] = {
    dcap.BACKEND_SGX: dcap.verify, dcap.BACKEND_TDX: dcap.verify, snp.BACKEND: snp.verify}
BACKENDS = (dev.BACKEND, *HARDWARE_BACKENDS)


def parse_expected(text: str) -> Expected:
    """``BACKEND:HEX`` (``tempo keyserver --expect``) -> (backend, measurement in lower-case hex)."""
    backend, sep, measurement = text.partition(":")
    if not sep:
        raise ConfigError(f"--expect {text!r} names no backend: write BACKEND:MEASUREMENT, e.g. sgx:<MRENCLAVE> or "
                          "dev:<the value of `tempo measure`> (a measurement is pinned to the backend that took it)")
    if backend not in BACKENDS:
        raise ConfigError(f"--expect {text!r}: unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    try:
        if not bytes.fromhex(measurement):
            raise ValueError
    except ValueError:
        raise ConfigError(f"--expect {text!r}: {measurement!r} is not a hex measurement") from None
    return backend, measurement.lower()


def load_roots(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file (a vendor root, or AMD's ASK and ARK together)."""
    try:
        certificates = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot read --trust-root {path}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"--trust-root {path} holds no PEM certificate") from None
    return certificates
