"""The enclave's side of attestation: where ``tempo train --attestation BACKEND`` gets its evidence."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from . import dcap, dev, snp, tsm
from .evidence import Attester


def attester(backend: str, *, dev_key: Path | None = None) -> Attester:
    """The enclave-side evidence source for `backend`, as ``tempo train --attestation`` names it."""
    if backend == dev.BACKEND:
        if dev_key is None:
            raise ConfigError("--attestation dev needs --dev-key FILE (`tempo measure --dev-key FILE` makes one)")
        return dev.DevAttester(dev.load_signing_key(dev_key))
    if dev_key is not None:
        raise ConfigError(f"--dev-key goes with --attestation dev, not {backend}")
    if backend == dcap.BACKEND_SGX:
        return dcap.GramineSgxAttester()
    if backend == dcap.BACKEND_TDX:
        return dcap.TdxAttester(_tdx_quote)
    if backend == snp.BACKEND:
        return snp.SnpAttester()
    raise ConfigError(f"unknown attestation backend {backend!r}; choose from {ATTESTATION_BACKENDS}")


ATTESTATION_BACKENDS = (dev.BACKEND, dcap.BACKEND_SGX, dcap.BACKEND_TDX, snp.BACKEND)


def _tdx_quote(data: bytes) -> bytes:
    """A TDX quote through configfs-tsm (provider tdx_guest)."""
    report = tsm.get_report(data)
    if report.provider != "tdx_guest":
        raise ConfigError(f"the kernel's TSM provider is {report.provider!r}, not 'tdx_guest': this is not a TDX guest")
    return report.outblob
