"""Workers on other hosts: they join with the job's token and talk over torch.distributed pair groups.

``tempo train --listen HOST:PORT --workers N --token-file T`` hosts the rendezvous and waits until N
workers have proved the token (:mod:`tempo.wire.dist`); ``tempo worker --connect HOST:PORT
--token-file T`` runs on each GPU host. A worker with a wrong token or another protocol version is
refused with the reason on both sides and does not count toward N.
"""

from __future__ import annotations

import datetime
import hmac
import json
import os
import socket
from collections.abc import Callable

from torch.distributed import TCPStore

from ..errors import ConfigError, WorkerLostError, WorkerTimeoutError
from ..wire.dist import PREFIX, PairTransport, join_proof, pair_group, parse_address
from ..wire.messages import PROTOCOL_VERSION, Shutdown
from .pools import DEFAULT_TIMEOUT_S, LinkPool

DEFAULT_JOIN_TIMEOUT_S = 600.0


class DistributedPool(LinkPool):
    """N workers that joined through the rendezvous this pool hosts on `listen`."""

    def __init__(self, n: int, *, listen: str, token: bytes, timeout: float = DEFAULT_TIMEOUT_S,
                 join_timeout: float = DEFAULT_JOIN_TIMEOUT_S, log: Callable[[str], None] = print):
        super().__init__(timeout)
        if n < 1:
            raise ConfigError(f"need at least one worker, got {n}")
        host, port = parse_address(listen)
        self._token, self._log = token, log
        self._bind = host if host not in ("0.0.0.0", "") else socket.gethostbyname(socket.gethostname())
        try:
            self._store = TCPStore(host, port, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=join_timeout))
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"cannot listen on {listen}: {' '.join(str(e).split())[:200]}") from None
        self._challenge = os.urandom(32)
        self._store.set(PREFIX + "version", str(PROTOCOL_VERSION))
        self._store.set(PREFIX + "challenge", self._challenge.hex())
        log(f"waiting for {n} worker(s) on {listen} (tempo worker --connect {listen} --token-file ...)")
        slot = 0
        while len(self._links) < n:
            slot += 1
            try:
                self._store.wait([f"{PREFIX}join/{slot}"], datetime.timedelta(seconds=join_timeout))
            except RuntimeError:
                raise WorkerTimeoutError(f"only {len(self._links)} of {n} workers joined within {join_timeout} s "
                                         f"on {listen}") from None
            link = self._admit(slot)
            if link is not None:
                self._links.append(link)
                log(f"{link.peer} joined ({len(self._links)}/{n})")

    def _admit(self, slot: int) -> PairTransport | None:
        """The pair link of the worker in `slot`, or None (and the reason, to it and to the log)."""
        try:
            request = json.loads(self._store.get(f"{PREFIX}join/{slot}"))
            name, version, proof = str(request["name"]), int(request["version"]), str(request["proof"])
        except (ValueError, KeyError, TypeError):
            return self._refuse(slot, "a malformed join request")
        if version != PROTOCOL_VERSION:
            return self._refuse(slot, f"protocol version {version}; this enclave speaks {PROTOCOL_VERSION}")
        if not hmac.compare_digest(proof, join_proof(self._token, self._challenge, slot)):
            return self._refuse(slot, "wrong token")
        self._store.set(f"{PREFIX}accept/{slot}", "ok")
        group = pair_group(self._store, slot, 0, self.timeout, self._bind)
        return PairTransport(group, me=0, peer=f"worker {name[:64]!r} (slot {slot})")

    def _refuse(self, slot: int, reason: str) -> None:
        self._store.set(f"{PREFIX}accept/{slot}", f"refused: {reason}")
        self._log(f"refused the worker in slot {slot}: {reason}")
        return None

    def close(self) -> None:
        for link in self._links:
            try:
                link.send(Shutdown())
            except WorkerLostError:
                pass
        self._links = []
