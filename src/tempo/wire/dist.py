"""Messages over torch.distributed: one standalone gloo process group per enclave-worker pair.

The enclave hosts a TCPStore (the rendezvous); each worker joins through it with a proof of the
job's token and then shares a two-rank gloo group with the enclave, over which codec frames travel
as uint8 tensors (p2p send/recv; the enclave has no GPU, so gloo). Why a pair per worker and not
one world: a gloo group fails as a whole when a member dies, and its size is fixed. With pairs, a
crashed worker breaks only its own link (measured: its pair raises "Connection closed by peer",
the others carry on) and a worker can join later under a new slot.

Joining, through the store (keys under ``tempo/``)::

    enclave: challenge = 32 random bytes, version = PROTOCOL_VERSION
    worker:  slot = add("tempo/joins", 1); set("tempo/join/<slot>", {version, name, proof})
             proof = HMAC-SHA256(token, challenge || slot)
    enclave: set("tempo/accept/<slot>", "ok" or "refused: <reason>"); on "ok" both open the pair
             group under prefix "tempo/link/<slot>"

The store itself is not authenticated (anyone who reaches the port can write keys), so a stranger
can waste slots but never gets a link: the enclave opens one only for a valid proof.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import socket
from pathlib import Path

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, Store, TCPStore, Work

from ..errors import ConfigError, ProtocolError, WorkerLostError, WorkerTimeoutError
from .codec import decode, encode
from .messages import PROTOCOL_VERSION, Message
from .transport import DEFAULT_MAX_MESSAGE_BYTES, TrafficStats

PREFIX = "tempo/"
FOREVER_S = 10 * 365 * 86400.0
MIN_TOKEN_BYTES = 16


def read_token(path: Path) -> bytes:
    """The job's secret token: the file's bytes, surrounding whitespace stripped; at least 16 bytes."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"cannot read token file {path}: {e.strerror}") from None
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(f"token file {path} holds {len(token)} bytes; a token needs at least {MIN_TOKEN_BYTES} "
                          "(e.g. `head -c 32 /dev/urandom | base64 > token`)")
    return token


def parse_address(text: str, *, allow_any_port: bool = False) -> tuple[str, int]:
    """HOST:PORT; port 0 (any free port) only with `allow_any_port`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if allow_any_port else 1) <= int(port) < 65536:
        raise ConfigError(f"an address is HOST:PORT, got {text!r}")
    return host, int(port)


def join_proof(token: bytes, challenge: bytes, slot: int) -> str:
    return hmac.new(token, challenge + str(slot).encode(), hashlib.sha256).hexdigest()


def pair_group(store: Store, slot: int, rank: int, timeout: float, bind: str) -> ProcessGroupGloo:
    """The two-rank gloo group of slot `slot` (the enclave is rank 0, the worker rank 1), its sockets on
    the local address `bind`: the one the rendezvous runs over, so that the pair works across hosts and
    network namespaces whatever the hostname resolves to."""
    options = ProcessGroupGloo._Options()
    options._devices = [ProcessGroupGloo.create_device(hostname=bind)]
    options._timeout = datetime.timedelta(seconds=timeout)
    return ProcessGroupGloo(PrefixStore(f"{PREFIX}link/{slot}", store), rank, 2, options)


def local_address_towards(host: str, port: int) -> str:
    """This host's address on the route to host:port (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
        except OSError as e:
            raise WorkerLostError(f"no route to {host}:{port}: {e.strerror}") from None
        return probe.getsockname()[0]


def connect(address: str, token: bytes, name: str, *, timeout: float) -> tuple[PairTransport, TCPStore]:
    """The worker's side of joining: prove the token, get a slot, open the pair group."""
    host, port = parse_address(address)
    try:
        store = TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, OSError) as e:
        raise WorkerLostError(f"cannot reach the enclave at {address}: {e}") from None
    theirs = int(store.get(PREFIX + "version"))
    if theirs != PROTOCOL_VERSION:
        raise ConfigError(f"the enclave at {address} speaks protocol version {theirs}; this worker speaks "
                          f"{PROTOCOL_VERSION}: install the same Tempo on both sides")
    challenge = bytes.fromhex(store.get(PREFIX + "challenge").decode())
    slot = store.add(PREFIX + "joins", 1)
    store.set(f"{PREFIX}join/{slot}", json.dumps({"version": PROTOCOL_VERSION, "name": name,
                                                   "proof": join_proof(token, challenge, slot)}))
    store.wait([f"{PREFIX}accept/{slot}"], datetime.timedelta(seconds=timeout))
    answer = store.get(f"{PREFIX}accept/{slot}").decode()
    if answer != "ok":
        raise ConfigError(f"the enclave at {address} refused this worker: {answer.removeprefix('refused: ')}")
    group = pair_group(store, slot, 1, FOREVER_S, local_address_towards(host, port))
    # A reply may wait unread while the enclave waits on other workers or runs its own layers: the
    # worker's sends wait as long as the link lives (a dead enclave closes it).
    return PairTransport(group, me=1, peer=f"enclave at {address}", send_timeout=FOREVER_S), store


class PairTransport:
    """Codec frames over a two-rank gloo group: an int64 length (tag 0), then the bytes (tag 1).

    A send only starts the transfer, which gloo carries on in the background, and returns: the
    enclave blinds the next shard, and sends to other workers, while this one is on the wire. The
    next send or receive on the link first waits for it. A gloo send completes only once the peer
    receives, so `send_timeout` bounds that wait for a peer that stopped reading (a stalled worker).
    """

    def __init__(self, group: ProcessGroupGloo, *, me: int, peer: str, send_timeout: float,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.group, self.other, self.peer, self.max_message_bytes = group, 1 - me, peer, max_message_bytes
        self.send_timeout = send_timeout
        self.stats = TrafficStats()
        self._sending: list[tuple[Work, torch.Tensor]] = []  # transfers in flight, with the buffers they read

    def _start(self, op: str, tensor: torch.Tensor, tag: int) -> Work:
        try:
            return getattr(self.group, op)([tensor], self.other, tag)
        except RuntimeError as e:
            raise self._error(op, e, None) from None

    def _wait(self, op: str, work: Work, timeout: float) -> None:
        try:
            work.wait(datetime.timedelta(seconds=timeout))
        except RuntimeError as e:
            raise self._error(op, e, timeout) from None

    def _error(self, op: str, e: RuntimeError, timeout: float | None) -> WorkerLostError | WorkerTimeoutError:
        """A dead, reset or silent peer as the worker error that says so."""
        text = " ".join(str(e).split())
        if "imed out" in text or "timeout" in text.lower():
            return WorkerTimeoutError(f"{self.peer} sent nothing for {timeout} s" if op == "recv" else
                                      f"{self.peer} took no message for {timeout} s")
        return WorkerLostError(f"link to {self.peer} lost ({'send' if op == 'send' else 'receive'}): {text[:200]}")

    def flush(self) -> None:
        """Wait until what was sent has been received."""
        sending, self._sending = self._sending, []
        for work, _ in sending:
            self._wait("send", work, self.send_timeout)

    def send(self, msg: Message) -> None:
        self.flush()
        frame = encode(msg)
        length, payload = torch.tensor([len(frame)], dtype=torch.int64), torch.frombuffer(bytearray(frame),
                                                                                          dtype=torch.uint8)
        self._sending = [(self._start("send", length, 0), length), (self._start("send", payload, 1), payload)]
        self.stats.bytes_sent += len(frame) + 8
        self.stats.messages_sent += 1

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; no `timeout`: wait as long as the link lives (a worker between jobs)."""
        self.flush()
        timeout = FOREVER_S if timeout is None else timeout
        length = torch.empty(1, dtype=torch.int64)
        self._wait("recv", self._start("recv", length, 0), timeout)
        n = int(length.item())
        if not 0 < n <= self.max_message_bytes:
            raise ProtocolError(f"{self.peer} announced a {n}-byte message (limit {self.max_message_bytes})")
        payload = torch.empty(n, dtype=torch.uint8)
        self._wait("recv", self._start("recv", payload, 1), timeout)
        self.stats.bytes_received += n + 8
        self.stats.messages_received += 1
        return decode(payload.numpy().tobytes(), max_bytes=self.max_message_bytes)

    def close(self) -> None:
        """Deliver what is still being sent, if the peer takes it; the group goes with its last reference."""
        try:
            self.flush()
        except (WorkerLostError, WorkerTimeoutError):
            pass
