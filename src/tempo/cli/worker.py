"""``tempo worker``: serve an enclave's blinded products from this (GPU) host."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer


def worker(
    connect: Annotated[str, typer.Option(help="HOST:PORT the enclave listens on (`tempo train --listen`).")],
    token_file: Annotated[Path, typer.Option(help="The job's secret token, the same file as the enclave's.")],
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu ... (default: CUDA when there is one).")
                      ] = None,
    name: Annotated[str, typer.Option(help="How the enclave's log names this worker.")] = socket.gethostname(),
    timeout: Annotated[float, typer.Option(help="Seconds to wait to join the enclave.")] = 600.0,
    idle_timeout: Annotated[float | None, typer.Option(
        help="Stop after this many seconds without a job (default: wait as long as the link lives; an "
             "enclave that is cut off the network, rather than stopped, never closes it).")] = None,
) -> None:
    """Join an enclave with the job's token and run its blinded products until it shuts down.

    Everything this worker sees is blinded; everything it returns is verified by the enclave."""
    from ..worker.__main__ import main

    raise typer.Exit(main(["--connect", connect, "--token-file", str(token_file), "--name", name,
                           "--timeout", str(timeout), *(["--device", device] if device else []),
                           *(["--idle-timeout", str(idle_timeout)] if idle_timeout is not None else [])]))
