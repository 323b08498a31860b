"""What an enclave presents to the key server, and how it is bound to one key-release session."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..errors import AttestationError

REPORT_DATA_BYTES = 64  # the size SGX, TDX and SEV-SNP reports give the enclave for its own data
_DOMAIN = b"tempo/key-release/v1"


def report_data(challenge: bytes, public_key: bytes) -> bytes:
    """The 64 bytes an enclave asks its TEE to sign: SHA-512 over the server's challenge and the
    enclave's ephemeral public key. Evidence for another challenge or key does not verify."""
    return hashlib.sha512(_DOMAIN + len(challenge).to_bytes(2, "big") + challenge + public_key).digest()


@dataclass(frozen=True)
class Evidence:
    backend: str  # "dev", later "sgx", "tdx", "sev-snp"
    measurement: str  # hex: what the backend measured (for dev: SHA-256 of Tempo's code)
    report_data: str  # hex, REPORT_DATA_BYTES
    body: dict[str, Any] = field(default_factory=dict)  # backend-specific proof (signature, quote, ...)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(raw: object) -> Evidence:
        """Parse untrusted JSON; anything malformed is an AttestationError naming what is wrong."""
        if not isinstance(raw, dict):
            raise AttestationError("evidence must be a JSON object")
        try:
            evidence = Evidence(str(raw["backend"]), str(raw["measurement"]), str(raw["report_data"]),
                                dict(raw.get("body", {})))
            bytes.fromhex(evidence.measurement)
            if len(bytes.fromhex(evidence.report_data)) != REPORT_DATA_BYTES:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise AttestationError("evidence is malformed: it needs backend, a hex measurement and "
                                   f"{REPORT_DATA_BYTES} bytes of hex report_data") from None
        return evidence


class Attester(Protocol):
    """An enclave-side evidence source: a TEE's report (or the dev signature) over 64 bytes of report data."""

    backend: str

    def evidence(self, report_data: bytes) -> Evidence: ...
