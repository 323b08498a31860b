"""Provisioning the enclave from a sealed bundle: attested key release, then the bundle opened in memory.

The data key arrives only after the owner's key server has checked this enclave's evidence
(:mod:`tempo.attestation.release`). The bundle is then authenticated and extracted into a private
in-memory folder (``/dev/shm`` where there is one, mode 0700), deleted when training ends. Inside
an SGX enclave under Gramine that folder is a tmpfs mount in enclave memory, and in a TDX or
SEV-SNP confidential VM all RAM is encrypted; on an ordinary host it is ordinary RAM, which is why
the ``dev`` attestation backend warns.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..attestation.release import Attester, request_key
from ..sealed.bundle import WEIGHTS_NAME, OpenBundle

_MEMORY = Path("/dev/shm")


@dataclass(frozen=True)
class Provisioned:
    config: dict  # the run's settings, as sealed by the owner
    data_dir: Path  # the dataset, in enclave memory
    init_weights: Path | None  # initial weights, if the bundle has them
    data_key: bytes  # seals what the run writes (the final model)
    run_id: str  # the bundle's run id, bound into what the run writes


@contextmanager
def provisioned(bundle: Path, keyserver: str, attester: Attester,
                log=lambda line: None) -> Iterator[Provisioned]:
    """Obtain the data key by attestation, open `bundle`, and yield what a run needs; clean up after."""
    key = request_key(keyserver, attester)
    log(f"data key released by {keyserver}")
    memory = _MEMORY if _MEMORY.is_dir() else None
    with OpenBundle(bundle, key) as opened, tempfile.TemporaryDirectory(prefix="tempo-bundle-", dir=memory) as d:
        folder = Path(d)
        opened.extract(folder)
        weights = folder / WEIGHTS_NAME
        log(f"bundle {bundle} (run {opened.run_id}) opened into {folder}")
        yield Provisioned(opened.config, folder / "data", weights if weights.is_file() else None, key, opened.run_id)
