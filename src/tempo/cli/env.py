"""``tempo env``: versions, devices and cores, to paste into a bug report."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import typer

PACKAGES = ("torch", "torchvision", "timm", "numpy", "cryptography", "typer", "tqdm")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def env() -> None:
    """Print Python, package and Tempo versions, CUDA devices and CPU count."""
    import torch

    import tempo

    lines = [f"tempo: {tempo.__version__}", f"python: {platform.python_version()} ({platform.platform()})"]
    lines += [f"{p}: {_version(p)}" for p in PACKAGES]
    lines.append(f"torch CUDA build: {torch.version.cuda or 'none'}")
    lines.append(f"CUDA available: {torch.cuda.is_available()}")
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        lines.append(f"  cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(f"CPUs: {os.cpu_count()} ({usable} usable by this process), torch threads {torch.get_num_threads()}")
    typer.echo("\n".join(lines))
