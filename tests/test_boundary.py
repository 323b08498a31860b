"""The trust boundary as a test: the worker side loads nothing from the enclave side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tempo"


def test_importing_the_worker_loads_no_enclave_code():
    code = ("import sys, tempo.worker, tempo.worker.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith('tempo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)  # a list literal of module names
    assert "tempo.worker" in loaded
    forbidden = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in
                 {"enclave", "schemes", "attacks", "training", "cli", "testing", "sealed", "attestation"}]
    assert not forbidden, f"the worker side loaded {forbidden}"


def test_worker_sources_import_nothing_from_the_enclave():
    for path in (SRC / "worker").rglob("*.py"):
        text = path.read_text()
        for banned in ("enclave", "schemes", "training", "testing", "sealed", "attestation"):
            assert f"from ..{banned}" not in text and f"tempo.{banned}" not in text, f"{path} imports {banned}"
