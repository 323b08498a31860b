"""Workers over torch.distributed: on other hosts, or as local processes, joined the same way.

``tempo train --listen HOST:PORT --workers N --token-file T`` hosts the rendezvous and waits until N
workers have proved the token (:mod:`tempo.wire.dist`); ``tempo worker --connect HOST:PORT
--token-file T`` runs on each GPU host. A worker with a wrong token or another protocol version is
refused with the reason on both sides and does not count toward N. The local default
(:class:`ProcessPool`) starts N worker processes that join the same way over loopback with a
one-time token, so local and remote runs share one transport and one failure model.
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from torch.distributed import QueueEmptyError, TCPStore

from ..errors import ConfigError, WorkerLostError, WorkerTimeoutError
from ..wire.dist import (
    CHALLENGE_KEY,
    JOINS_KEY,
    LINK_SETUP_TIMEOUT_S,
    POLL_S,
    STORE_TIMEOUT_S,
    VERSION_KEY,
    LentStore,
    LinkProofError,
    PairTransport,
    answer_key,
    pair_group,
    parse_address,
    prove_link,
    read_token,
)
from ..wire.join import MAX_NAME_CHARS, OK, REFUSED, WRONG_TOKEN, JoinRequest, answer, parse_request, proof_holds
from ..wire.messages import PROTOCOL_VERSION, Shutdown
from ..wire.text import printable
from .pools import DEFAULT_TIMEOUT_S, InProcessPool, LinkPool, WorkerPool

DEFAULT_JOIN_TIMEOUT_S = 600.0
CLOSE_TIMEOUT_S = 5.0  # how long a Shutdown may wait for an idle worker to take it
REQUESTS_PER_POLL = 16  # join requests read per poll: a flood of them cannot starve the loop's checks
LOGGED_REFUSALS = 20  # refusals logged one by one; a flood of strangers' requests is only counted after that


class DistributedPool(LinkPool):
    """N workers that joined through the rendezvous this pool hosts on `listen` (port 0: any free port).

    Join requests come through a queue in the store and are answered one by one; each accepted one
    opens its pair and proves the link in a thread of its own, so a peer that stalls holds up nobody
    else. The store is closed once N links are proved: from then on the network reaches no store."""

    def __init__(self, n: int, *, listen: str, token: bytes, timeout: float = DEFAULT_TIMEOUT_S,
                 join_timeout: float = DEFAULT_JOIN_TIMEOUT_S, log: Callable[[str], None] = print):
        super().__init__(timeout)
        if n < 1:
            raise ConfigError(f"need at least one worker, got {n}")
        host, port = parse_address(listen, allow_any_port=True)
        self._n, self._token, self._log = n, token, log
        self._bind = host if host not in ("0.0.0.0", "") else socket.gethostbyname(socket.gethostname())
        try:
            self._store: TCPStore | None = TCPStore(host, port, is_master=True, wait_for_workers=False,
                                                    timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"cannot listen on {listen}: {' '.join(str(e).split())[:200]}") from None
        self.address = f"{host}:{self._store.port}"
        self._challenge = os.urandom(32)  # the enclave's copy; the store's may be rewritten by anyone
        self._store.set(VERSION_KEY, str(PROTOCOL_VERSION))
        self._store.set(CHALLENGE_KEY, self._challenge.hex())
        self._lock = threading.Lock()  # guards the links, `joined`, `_lent` and `_joining`
        self._joining, self._lent, self._slots, self._refusals = True, [], 0, 0
        self._accepted: set[bytes] = set()  # nonces of accepted requests: a replayed one is ignored
        self.joined: list[str] = []  # the name each worker joined with, in link order
        try:
            self._listening(n)
            self._await_workers(n, join_timeout)
        finally:
            self._close_rendezvous()

    def _listening(self, n: int) -> None:
        """The rendezvous is up at ``self.address``: tell whoever starts the workers."""
        self._log(f"waiting for {n} worker(s) on {self.address} "
                  f"(tempo worker --connect {self.address} --token-file ...)")

    def _await_workers(self, n: int, join_timeout: float) -> None:
        deadline = time.monotonic() + join_timeout
        while True:
            with self._lock:
                if len(self._links) >= n:
                    return
            self._still_joining()
            if time.monotonic() > deadline:
                raise WorkerTimeoutError(f"only {len(self._links)} of {n} workers joined within "
                                         f"{join_timeout} s on {self.address}")
            for _ in range(REQUESTS_PER_POLL):
                try:
                    raw = self._store.queue_pop(JOINS_KEY, block=False)
                except QueueEmptyError:
                    break
                self._answer(raw, min(LINK_SETUP_TIMEOUT_S, max(deadline - time.monotonic(), 1.0)))
            time.sleep(POLL_S)

    def _still_joining(self) -> None:
        """Called while waiting for a join: raise if the workers can no longer come."""

    def _answer(self, raw: bytes, link_timeout: float) -> None:
        """Answer one join request; an accepted one opens its pair in a thread of its own."""
        self._slots += 1
        slot, req = self._slots, parse_request(raw)
        if isinstance(req, str):  # no nonce to answer to
            return self._refused(slot, "?", req)
        if req.version != PROTOCOL_VERSION:
            return self._refuse(slot, req, f"protocol version {req.version}; this enclave speaks {PROTOCOL_VERSION}")
        if not proof_holds(self._token, req, self._challenge):
            return self._refuse(slot, req, WRONG_TOKEN)
        if req.nonce in self._accepted:  # a copy of a request already accepted
            return self._refused(slot, req.name, "a replayed join request")
        self._accepted.add(req.nonce)
        self._store.queue_push(answer_key(req.nonce), answer(self._token, req.nonce, slot, OK))
        threading.Thread(target=self._link, args=(slot, req.name, link_timeout), daemon=True,
                         name=f"tempo-join-{slot}").start()

    def _refuse(self, slot: int, req: JoinRequest, reason: str) -> None:
        self._store.queue_push(answer_key(req.nonce), answer(self._token, req.nonce, slot, REFUSED + reason))
        self._refused(slot, req.name, reason)

    def _refused(self, slot: int, name: str, reason: str) -> None:
        self._refusals += 1
        if self._refusals <= LOGGED_REFUSALS:
            self._log(f"refused the worker in slot {slot}: {reason}"
                      + ("" if name == "?" else f" (it calls itself '{printable(name, MAX_NAME_CHARS)}')"))
        elif self._refusals == LOGGED_REFUSALS + 1:
            self._log(f"refused {LOGGED_REFUSALS} join requests; further refusals are not logged")

    def _link(self, slot: int, name: str, timeout: float) -> None:
        """Open slot `slot`'s pair and prove the link; keep it if the pool still needs a worker."""
        peer = f"worker '{printable(name, MAX_NAME_CHARS)}' (slot {slot})"
        with self._lock:
            if not self._joining:
                return
            lent = LentStore(self._store)
            self._lent.append(lent)
        try:
            group = pair_group(lent, slot, 0, timeout, self._bind)
            prove_link(group, self._token, slot, me=0, timeout=timeout)
        except (LinkProofError, RuntimeError) as e:
            self._log(f"dropped the pair of slot {slot} ({peer}): {printable(' '.join(str(e).split()))}")
            return
        finally:
            lent.take_back()
        link = PairTransport(group, me=0, peer=peer, send_timeout=self.timeout)
        with self._lock:
            if self._joining and len(self._links) < self._n:
                self._links.append(link)
                self.joined.append(name)
                self._log(f"{peer} joined ({len(self._links)}/{self._n})")
                return
        self._log(f"{peer} proved the token after all workers had joined: sent away")
        self._send_away(link)

    def _close_rendezvous(self) -> None:
        """Stop the join: pairs still opening fail, and the store (its server, and whatever the network
        wrote into it) goes with its last reference."""
        with self._lock:
            self._joining = False
            lent, self._lent = self._lent, []
        for store in lent:
            store.take_back()
        self._store = None

    def close(self) -> None:
        """Tell every idle worker to stop; drop the links (a worker still mid-job sees its link close)."""
        for i, link in enumerate(self._links):
            if not self.busy(i):
                self._send_away(link)
        self._links = []

    @staticmethod
    def _send_away(link: PairTransport) -> None:
        link.send_timeout = CLOSE_TIMEOUT_S
        try:
            link.send(Shutdown())
        except (WorkerLostError, WorkerTimeoutError):
            return
        link.close()


class ProcessPool(DistributedPool):
    """Each worker a separate ``python -m tempo.worker`` process that this pool starts and that joins it
    with a one-time token (a 0600 file, deleted once the pool is up): by default on this machine over
    loopback. `launch(i, argv)` gives the command line that runs worker i's `argv` elsewhere (inside a
    network namespace, say: ``benchmarks/worker_scaling.py``); `listen` must then be reachable from there."""

    def __init__(self, n: int, *, timeout: float = DEFAULT_TIMEOUT_S, device: str | None = None,
                 record: Path | None = None, record_steps: int | None = None, record_until: int | None = None,
                 join_timeout: float = 120.0, listen: str = "127.0.0.1:0",
                 launch: Callable[[int, list[str]], list[str]] | None = None):
        self._procs: list[subprocess.Popen] = []
        self._launch = launch or (lambda _, argv: argv)
        self._worker_args = []
        for i in range(n):
            args = ["--name", f"worker-{i}", "--timeout", str(join_timeout)] + (["--device", device] if device else [])
            if record is not None:
                args += ["--record", str(record / f"worker-{i}")]
                args += ["--record-steps", str(record_steps)] if record_steps else []
                args += ["--record-until", str(record_until)] if record_until else []
            self._worker_args.append(args)
        token = secrets.token_hex(32).encode()
        with tempfile.TemporaryDirectory(prefix="tempo-pool-") as private:
            self._token_file = Path(private) / "token"
            self._token_file.touch(mode=0o600)
            self._token_file.write_bytes(token)
            try:
                super().__init__(n, listen=listen, token=token, timeout=timeout, join_timeout=join_timeout,
                                 log=lambda _: None)
            except BaseException:
                self.close()
                raise
        by_name = dict(zip(self.joined, self._links, strict=True))
        self._links = [by_name[f"worker-{i}"] for i in range(n)]
        for i, (link, proc) in enumerate(zip(self._links, self._procs, strict=True)):
            link.peer = f"worker-{i} (pid {proc.pid})"

    def _listening(self, n: int) -> None:
        # PASSIVE: idle OpenMP threads sleep instead of spinning, so the enclave and the workers
        # sharing cores do not starve each other. A new session keeps Ctrl-C for the enclave alone.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        for i, args in enumerate(self._worker_args):
            argv = [sys.executable, "-m", "tempo.worker", "--connect", self.address,
                    "--token-file", str(self._token_file), *args]
            self._procs.append(subprocess.Popen(self._launch(i, argv), env=env, start_new_session=True))

    def _still_joining(self) -> None:
        for i, proc in enumerate(self._procs):
            if proc.poll() is not None:
                raise WorkerLostError(f"worker-{i} (pid {proc.pid}) exited with code {proc.returncode} before "
                                      "it joined (its error is above)")

    def _lost_detail(self, index: int) -> str:
        code = self._procs[index].poll()
        return f"; the worker process {f'exited with code {code}' if code is not None else 'is still running'}"

    def close(self) -> None:
        busy = {i for i in range(len(self._links)) if self.busy(i)}
        super().close()
        for i, proc in enumerate(self._procs):
            try:
                proc.wait(timeout=0 if i in busy else 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []


def local_workers(n: int = 2, *, in_process: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
                  device: str | None = None, record: Path | None = None, record_steps: int | None = None,
                  record_until: int | None = None) -> WorkerPool:
    """Start `n` workers on this machine: separate processes by default, or objects in this process.

    `record`: every worker also writes a transcript of its training traffic to ``record/worker-i``
    (the colluding adversary of the leakage suite), keeping the last `record_steps` steps up to
    step `record_until`.
    """
    if n < 1:
        raise ConfigError(f"need at least one worker, got {n}")
    if record_steps is not None and record_steps < 1:
        raise ConfigError(f"record_steps must be >= 1, got {record_steps}")
    if in_process:
        return InProcessPool(n, device=device, record=record, record_steps=record_steps,
                             record_until=record_until)
    return ProcessPool(n, timeout=timeout, device=device, record=record, record_steps=record_steps,
                       record_until=record_until)


def remote_workers(n: int, *, listen: str, token_file: Path, timeout: float = DEFAULT_TIMEOUT_S,
                   join_timeout: float = DEFAULT_JOIN_TIMEOUT_S) -> DistributedPool:
    """Host the rendezvous on `listen` (HOST:PORT) and wait until `n` workers (``tempo worker --connect
    HOST:PORT --token-file T`` on each GPU host) have joined with the token in `token_file`."""
    return DistributedPool(n, listen=listen, token=read_token(token_file), timeout=timeout, join_timeout=join_timeout)
