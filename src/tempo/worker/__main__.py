"""Entry point of a worker process.

``python -m tempo.worker --fd N``: started by the enclave's local process pool with one end of a
socket pair. ``python -m tempo.worker --connect HOST:PORT --token-file T`` (what ``tempo worker``
runs): joins an enclave on another host over torch.distributed. Imports nothing from the enclave side.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from ..errors import ConfigError, WorkerLostError
from ..wire.dist import connect, read_token
from ..wire.transport import SocketTransport
from .core import WorkerCore
from .recorder import RecordingCore
from .server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tempo.worker")
    link = parser.add_mutually_exclusive_group(required=True)
    link.add_argument("--fd", type=int, help="connected socket file descriptor (local process pool)")
    link.add_argument("--connect", help="HOST:PORT of an enclave's rendezvous (remote worker)")
    parser.add_argument("--token-file", type=Path, help="the job's secret token (with --connect)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the enclave")
    parser.add_argument("--name", default="worker")
    parser.add_argument("--device", default=None)
    parser.add_argument("--record", type=Path, default=None, help="also write a transcript of training jobs here")
    parser.add_argument("--record-steps", type=int, default=None, help="keep only the last N recorded steps")
    parser.add_argument("--record-until", type=int, default=None, help="record nothing after this step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"[{args.name}] %(message)s", stream=sys.stderr)
    try:
        core = (WorkerCore(args.device) if args.record is None
                else RecordingCore(args.record, keep_steps=args.record_steps, until=args.record_until,
                                      device=args.device))
        if args.fd is not None:
            serve(SocketTransport(socket.socket(fileno=args.fd), peer="enclave"), core)
        else:
            return serve_remote(args.connect, args.token_file, args.name, core, timeout=args.timeout)
    except WorkerLostError:
        return 0  # the enclave went away: nothing left to do
    except KeyboardInterrupt:
        return 130
    return 0


def serve_remote(address: str, token_file: Path | None, name: str, core: WorkerCore, *, timeout: float) -> int:
    """Join the enclave at `address` with the token and serve its jobs; 2 if the join is refused."""
    if token_file is None:
        print("error: --connect needs --token-file: the job's secret token", file=sys.stderr)
        return 2
    try:
        transport, _store = connect(address, read_token(token_file), name, timeout=timeout)
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"[{name}] joined {transport.peer}; serving on device {core.device}", file=sys.stderr)
    serve(transport, core)  # _store keeps the rendezvous connection open while serving
    return 0


if __name__ == "__main__":
    sys.exit(main())
