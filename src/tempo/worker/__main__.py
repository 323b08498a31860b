"""Entry point of a local worker process: ``python -m tempo.worker --fd N``.

Started by the enclave's process pool with one end of a socket pair. Imports nothing from the
enclave side.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from ..errors import WorkerLostError
from ..wire.transport import SocketTransport
from .core import WorkerCore
from .recorder import RecordingCore
from .server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tempo.worker")
    parser.add_argument("--fd", type=int, required=True, help="connected socket file descriptor")
    parser.add_argument("--name", default="worker")
    parser.add_argument("--device", default=None)
    parser.add_argument("--record", type=Path, default=None, help="also write a transcript of training jobs here")
    parser.add_argument("--record-steps", type=int, default=None, help="keep only the last N recorded steps")
    parser.add_argument("--record-until", type=int, default=None, help="record nothing after this step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"[{args.name}] %(message)s", stream=sys.stderr)
    sock = socket.socket(fileno=args.fd)
    try:
        core = (WorkerCore(args.device) if args.record is None
                else RecordingCore(args.record, keep_steps=args.record_steps, until=args.record_until,
                                      device=args.device))
        serve(SocketTransport(sock, peer="enclave"), core)
    except WorkerLostError:
        return 0  # the enclave went away: nothing left to do
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
