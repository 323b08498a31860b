"""Entry point of a worker process.

``python -m tempo.worker --connect HOST:PORT --token-file T`` (what ``tempo worker`` runs): joins an
enclave over torch.distributed, on another host or (the local process pool) over loopback with a
one-time token. Imports nothing from the enclave side.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from ..errors import ConfigError, WorkerLostError, WorkerTimeoutError
from ..wire.dist import connect, read_token
from .core import WorkerCore
from .recorder import RecordingCore
from .server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tempo.worker")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the enclave's rendezvous")
    parser.add_argument("--token-file", type=Path, required=True, help="the job's secret token")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait to join the enclave")
    parser.add_argument("--idle-timeout", type=float, default=None, help="stop after this long without a job")
    parser.add_argument("--name", default="worker")
    parser.add_argument("--device", default=None)
    parser.add_argument("--record", type=Path, default=None, help="also write a transcript of training jobs here")
    parser.add_argument("--record-steps", type=int, default=None, help="keep only the last N recorded steps")
    parser.add_argument("--record-until", type=int, default=None, help="record nothing after this step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"[{args.name}] %(message)s", stream=sys.stderr)
    # a warning (a token file others can read) as one line, not the library's source line
    warnings.showwarning = lambda message, *_, **__: print(f"[{args.name}] warning: {message}", file=sys.stderr)
    try:
        try:
            core = (WorkerCore(args.device) if args.record is None
                    else RecordingCore(args.record, keep_steps=args.record_steps, until=args.record_until,
                                          device=args.device))
        except ConfigError as e:
            print(f"[{args.name}] error: {e}", file=sys.stderr)
            return 2
        return serve_remote(args.connect, args.token_file, args.name, core, timeout=args.timeout,
                            idle_timeout=args.idle_timeout)
    except (WorkerLostError, WorkerTimeoutError) as e:  # the enclave went away or fell silent: nothing left to do
        print(f"[{args.name}] stopping: {' '.join(str(e).split())[:200]}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        return 130
    return 0


def serve_remote(address: str, token_file: Path, name: str, core: WorkerCore, *, timeout: float,
                 idle_timeout: float | None = None) -> int:
    """Join the enclave at `address` with the token and serve its jobs; 2 if the join is refused."""
    try:
        transport = connect(address, read_token(token_file), name, timeout=timeout,
                            notice=lambda text: print(f"[{name}] {text}", file=sys.stderr))
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"[{name}] joined {transport.peer}; serving on device {core.device}", file=sys.stderr)
    serve(transport, core, idle_timeout=idle_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
