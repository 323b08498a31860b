"""The ``dev`` backend: a software measurement signed with an Ed25519 key. It is NOT a TEE.

The measurement is the SHA-256 of every source file of the installed Tempo package (paths and
bytes, in sorted order): a key server that expects it refuses a modified Tempo. But the signing
key is an ordinary file, and nothing stops whoever holds it from signing any measurement, so this
backend proves nothing about the hardware or the process that holds the key. It exists to run
and test the key-release flow where there is no TEE, and it warns every time it is used.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import AttestationError, ConfigError
from .evidence import Evidence

BACKEND = "dev"
WARNING = ("attestation backend 'dev' proves NOTHING about hardware: its signing key is a plain file, so "
           "the key server is trusting whoever holds it (use sgx, tdx or sev-snp in production)")
_DOMAIN = b"tempo/dev-evidence/v1"


def measure(package: Path | None = None) -> str:
    """SHA-256 (hex) of every ``.py`` file of the Tempo package: relative path, length, bytes, in order."""
    root = package or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        name = path.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def create_signing_key(path: Path) -> str:
    """Write a fresh Ed25519 private key (PEM, mode 0600, never overwriting); return its public key (hex)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists: refusing to overwrite a signing key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return public_key_hex(key)


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise ConfigError(f"cannot read the dev signing key {path}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM private key (make one with `tempo measure --dev-key FILE`)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


class DevAttester:
    """The enclave side: evidence for `report_data`, signed with the dev key."""

    backend = BACKEND

    def __init__(self, signing_key: Ed25519PrivateKey, measurement: str | None = None):
        self._key, self.measurement = signing_key, measurement or measure()

    def evidence(self, report_data: bytes) -> Evidence:
        warnings.warn(f"tempo: {WARNING}", stacklevel=2)
        signature = self._key.sign(_DOMAIN + bytes.fromhex(self.measurement) + report_data)
        return Evidence(BACKEND, self.measurement, report_data.hex(),
                        {"public_key": public_key_hex(self._key), "signature": signature.hex()})


def verify(evidence: Evidence, trusted_keys: frozenset[str]) -> None:
    """The key server side: the signature is valid and made with a key the owner trusts."""
    try:
        public = str(evidence.body["public_key"])
        signature = bytes.fromhex(str(evidence.body["signature"]))
    except (KeyError, ValueError):
        raise AttestationError("dev evidence needs a hex public_key and signature") from None
    if public not in trusted_keys:
        raise AttestationError(f"dev evidence is signed by {public[:16]}..., which this key server does not "
                               "trust (--dev-trust)")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(
            signature, _DOMAIN + bytes.fromhex(evidence.measurement) + bytes.fromhex(evidence.report_data))
    except (InvalidSignature, ValueError):
        raise AttestationError("dev evidence signature does not verify") from None
