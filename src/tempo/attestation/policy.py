"""The key server's side of attestation: which evidence it accepts, checked against which roots of trust."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from ..errors import AttestationError, ConfigError
from . import dcap, dev, snp
from .evidence import Evidence


@dataclass(frozen=True)
class Policy:
    """What the key server accepts: these measurements, from these backends' roots of trust."""

    measurements: frozenset[str]
    dev_keys: frozenset[str] = field(default_factory=frozenset)  # trusted dev signing keys (hex)
    roots: tuple[x509.Certificate, ...] = ()  # vendor roots: Intel's (sgx, tdx), AMD's ARKs (sev-snp)

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
        if evidence.measurement not in self.measurements:
            raise AttestationError(f"measurement {evidence.measurement} is not the expected one")


HARDWARE_BACKENDS: dict[str, Callable[[Evidence, list[x509.Certificate]], None]] = {
    dcap.BACKEND_SGX: dcap.verify, dcap.BACKEND_TDX: dcap.verify, snp.BACKEND: snp.verify}


def load_roots(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file (a vendor root, or AMD's ASK and ARK together)."""
    try:
        certificates = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot read --trust-root {path}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"--trust-root {path} holds no PEM certificate") from None
    return certificates
