"""Messages over torch.distributed: one standalone gloo process group per enclave-worker pair.

The enclave hosts a TCPStore (the rendezvous); each worker joins through it and then shares a
two-rank gloo group with the enclave, over which codec frames travel as uint8 tensors (p2p
send/recv; the enclave has no GPU, so gloo). Why a pair per worker and not one world: a gloo
group fails as a whole when a member dies, and its size is fixed. With pairs, a crashed worker
breaks only its own link (measured: its pair raises "Connection closed by peer", the others carry
on) and a worker can join later under a new slot.

Joining (messages and proofs: :mod:`tempo.wire.join`; keys under ``tempo/``)::

    enclave: challenge = 32 random bytes (kept in enclave memory, a copy in the store)
    worker:  queue_push("tempo/joins", {version, name, nonce, proof}), nonce fresh, proof over
             the challenge and the nonce
    enclave: pops it, numbers it (the slot) and pushes onto queue "tempo/accept/<nonce>" its
             answer: slot, verdict ("ok" or "refused: ...") and a MAC over nonce, slot and verdict
    both, on a verified "ok": open the pair group under prefix "tempo/link/<slot>", then prove the
    link itself, before any job:
      enclave -> worker: enclave nonce (fresh, enclave memory)
      worker -> enclave: worker nonce, HMAC(token, "tempo-link-worker", slot, both nonces)
      enclave -> worker: HMAC(token, "tempo-link-enclave", slot, both nonces)

The store is not authenticated: anyone who reaches its port reads and writes any key, so it can
rewrite the challenge, push forged answers and race for either rank of a pair. No reservation
step exists (a request is one queue item), so a stranger holds no slot that others wait for, and
a forged answer cannot replace the enclave's (a queue, read until a verified one). The link proof
is what decides. A pair whose peer fails it is dropped and does not count, and the worker joins again
under a new slot; the enclave closes the store once its workers have joined. What a store writer
can and cannot do: docs/faults.md ("Hostile peers at the join").
"""

from __future__ import annotations

import datetime
import hmac
import os
import socket
import stat
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed import DistError, PrefixStore, ProcessGroupGloo, QueueEmptyError, Store, TCPStore, Work

from ..errors import ConfigError, ProtocolError, WorkerLostError, WorkerTimeoutError
from .codec import MAX_HEADER_BYTES, REPLY_HEADER_BYTES, decode, encode, reply_frame_bytes
from .join import (
    MAC_BYTES,
    NONCE_BYTES,
    OK,
    REFUSED,
    WRONG_TOKEN,
    Answer,
    join_proof,
    link_proof,
    read_answer,
    request,
)
from .messages import PROTOCOL_VERSION, Message
from .text import printable
from .transport import DEFAULT_MAX_MESSAGE_BYTES, TrafficStats

PREFIX = "tempo/"
FOREVER_S = 10 * 365 * 86400.0
MIN_TOKEN_BYTES = 32
TOKEN_RECIPE = "(umask 077; head -c 32 /dev/urandom | base64 > token)"
LINK_SETUP_TIMEOUT_S = 10.0  # to open a pair and prove the link, once both sides know the slot
ANSWER_TIMEOUT_S = 30.0  # for the enclave's answer to a join request (it answers within a poll)
UNVERIFIED_WAIT_S = 3.0  # how long after an unverified answer a verified one may still follow (a busy enclave)
UNVERIFIED_ATTEMPTS = 3  # slots tried before unverified refusals end the join
LINK_TAG = 2  # gloo tag of the link proof (frames use 0 and 1)
STORE_TIMEOUT_S = 10.0  # for one store operation once connected
POLL_S = 0.05
VERSION_KEY, CHALLENGE_KEY, JOINS_KEY = PREFIX + "version", PREFIX + "challenge", PREFIX + "joins"


class LinkProofError(Exception):
    """The peer on a pair did not prove the token: the pair is dropped."""


def read_token(path: Path) -> bytes:
    """The job's secret token: the file's bytes, surrounding whitespace stripped; at least 32 bytes.
    Warns when the file is readable by its group or others (the token is the job's only secret)."""
    try:
        token = Path(path).read_bytes().strip()
        mode = Path(path).stat().st_mode
    except OSError as e:
        raise ConfigError(f"cannot read token file {path}: {e.strerror}") from None
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(f"token file {path} holds {len(token)} bytes; a token needs at least {MIN_TOKEN_BYTES} "
                          f"(make one with `{TOKEN_RECIPE}`)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"token file {path} is readable by {'others' if mode & stat.S_IRWXO else 'its group'} "
                      f"(mode {stat.S_IMODE(mode):o}): anyone who reads it can join as a worker; "
                      f"`chmod 600 {path}`", UserWarning, stacklevel=2)
    return token


def parse_address(text: str, *, allow_any_port: bool = False) -> tuple[str, int]:
    """HOST:PORT; port 0 (any free port) only with `allow_any_port`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if allow_any_port else 1) <= int(port) < 65536:
        raise ConfigError(f"an address is HOST:PORT, got {text!r}")
    return host, int(port)


class LentStore(Store):
    """The rendezvous, lent to gloo while a pair opens and taken back after: a process group keeps
    its store for life, and the enclave closes its rendezvous once the workers have joined."""

    def __init__(self, store: Store):
        super().__init__()
        self._store: Store | None = store

    def take_back(self) -> None:
        self._store = None

    def _lent(self) -> Store:
        if self._store is None:
            raise RuntimeError("the rendezvous is closed")
        return self._store

    def set(self, key: str, value: bytes | str) -> None:
        self._lent().set(key, value)

    def get(self, key: str) -> bytes:
        return self._lent().get(key)

    def add(self, key: str, value: int) -> int:
        return self._lent().add(key, value)

    def check(self, keys: list[str]) -> bool:
        return self._lent().check(keys)

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        if timeout is None:
            self._lent().wait(keys)
        else:
            self._lent().wait(keys, timeout)

    def delete_key(self, key: str) -> bool:
        return self._lent().delete_key(key)

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        return self._lent().compare_set(key, expected, desired)

    def num_keys(self) -> int:
        return self._lent().num_keys()

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._lent().set_timeout(timeout)


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


def prove_link(group: ProcessGroupGloo, token: bytes, slot: int, *, me: int, timeout: float) -> None:
    """Both ends of a freshly opened pair prove the token to each other, bound to the slot and to two
    fresh nonces: the worker (rank 1) first, and the enclave (rank 0) only to a peer that did, so the
    enclave is no proof oracle. Every message has a fixed size. Raises LinkProofError."""
    end, peer = time.monotonic() + timeout, 1 - me

    def send(data: bytes) -> None:
        _link_op(group, "send", torch.frombuffer(bytearray(data), dtype=torch.uint8), peer, end)

    def recv(n: int) -> bytes:
        return _link_op(group, "recv", torch.empty(n, dtype=torch.uint8), peer, end).numpy().tobytes()

    if me == 0:
        enclave_nonce = os.urandom(NONCE_BYTES)
        send(enclave_nonce)
        reply = recv(NONCE_BYTES + MAC_BYTES)
        worker_nonce = reply[:NONCE_BYTES]
        if not hmac.compare_digest(reply[NONCE_BYTES:], link_proof(token, "worker", slot, enclave_nonce,
                                                                     worker_nonce)):
            raise LinkProofError("the peer did not prove the token on the link")
        send(link_proof(token, "enclave", slot, enclave_nonce, worker_nonce))
    else:
        enclave_nonce, worker_nonce = recv(NONCE_BYTES), os.urandom(NONCE_BYTES)
        send(worker_nonce + link_proof(token, "worker", slot, enclave_nonce, worker_nonce))
        if not hmac.compare_digest(recv(MAC_BYTES), link_proof(token, "enclave", slot, enclave_nonce,
                                                               worker_nonce)):
            raise LinkProofError("the peer did not prove the token on the link: it is not the enclave")


def _link_op(group: ProcessGroupGloo, op: str, tensor: torch.Tensor, peer: int, end: float) -> torch.Tensor:
    try:
        work = getattr(group, op)([tensor], peer, LINK_TAG)
        work.wait(datetime.timedelta(seconds=max(end - time.monotonic(), 0.001)))
    except RuntimeError as e:
        raise LinkProofError(f"no link proof ({op}): {printable(' '.join(str(e).split()))}") from None
    return tensor


def connect(address: str, token: bytes, name: str, *, timeout: float,
            notice: Callable[[str], None] = lambda _: None) -> PairTransport:
    """The worker's side of joining: request a slot with a proof of the token, open the pair, prove the
    link both ways. A failed pair, or an answer not signed with the token, is retried under a new slot
    (`notice` says so); only a signed refusal ends the join at once."""
    deadline = time.monotonic() + timeout
    store = reach(address, deadline)
    try:
        theirs = store.get(VERSION_KEY)
        if theirs != str(PROTOCOL_VERSION).encode():
            raise ConfigError(f"the enclave at {address} speaks protocol version "
                              f"{printable(theirs.decode('ascii', 'replace'), 20)}; this worker speaks "
                              f"{PROTOCOL_VERSION}: install the same Tempo on both sides")
        return _join(store, token, name, address, deadline, notice)
    except DistError as e:
        raise WorkerLostError(f"lost the rendezvous at {address}: {printable(' '.join(str(e).split()))}") from None


def reach(address: str, deadline: float) -> TCPStore:
    """A client of the rendezvous at `address`, tried every second until `deadline`: a worker started
    before the enclave connects as soon as it listens (TCPStore's own retries back off for tens of
    seconds, long enough to miss a join)."""
    host, port = parse_address(address)
    while True:
        try:
            store = TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=1))
        except (RuntimeError, OSError) as e:
            if time.monotonic() > deadline:
                raise WorkerLostError(f"cannot reach the enclave at {address}: "
                                      f"{printable(' '.join(str(e).split()))}") from None
            time.sleep(POLL_S)
            continue
        store.set_timeout(datetime.timedelta(seconds=STORE_TIMEOUT_S))
        return store


def _join(store: TCPStore, token: bytes, name: str, address: str, deadline: float,
          notice: Callable[[str], None]) -> PairTransport:
    bind = local_address_towards(*parse_address(address))
    doubts = 0
    while (left := deadline - time.monotonic()) > 0:
        nonce = os.urandom(NONCE_BYTES)
        store.queue_push(JOINS_KEY, request(PROTOCOL_VERSION, name, nonce,
                                            join_proof(token, PROTOCOL_VERSION, _challenge(store), nonce)))
        got = _await_answer(store, token, nonce, min(left, ANSWER_TIMEOUT_S))
        if got is None:
            notice("no answer to the join request; asking again")
            continue
        reason = printable(got.verdict.removeprefix(REFUSED))
        if got.verified and got.verdict == OK:
            try:
                return _open_link(store, token, got.slot, bind, address, min(left, LINK_SETUP_TIMEOUT_S))
            except LinkProofError as e:
                notice(f"the pair of slot {got.slot} failed ({e}); joining again under a new slot")
        elif got.verified and reason != WRONG_TOKEN:
            raise ConfigError(f"the enclave at {address} refused this worker: {reason}")
        elif got.verified:  # it holds our token, so the challenge we read from the store was not its own
            notice("the challenge read from the rendezvous was not the enclave's (rewritten?); asking again")
        else:
            doubts += 1
            said = f"refused this worker: {reason}" if got.verdict.startswith(REFUSED) else "answered this worker"
            if doubts == 1:
                notice(f"an answer this worker cannot verify ({said}): the enclave holds another token, or "
                       "someone who reaches its rendezvous wrote it; asking again")
            if doubts == UNVERIFIED_ATTEMPTS:
                raise ConfigError(f"the enclave at {address} {said} ({doubts} answers not signed with this "
                                  "worker's token: the enclave holds another token, or someone who reaches its "
                                  "rendezvous forged them)")
    raise WorkerTimeoutError(f"did not join the enclave at {address} within the join timeout")


def _challenge(store: TCPStore) -> bytes:
    """The enclave's challenge as the store holds it (anyone may have rewritten it: then the proof fails)."""
    try:
        return bytes.fromhex(store.get(CHALLENGE_KEY)[:2 * NONCE_BYTES].decode("ascii"))
    except ValueError:
        return b""


def _await_answer(store: TCPStore, token: bytes, nonce: bytes, timeout: float) -> Answer | None:
    """The enclave's answer to the request with `nonce`: a verified one as soon as it is there; the first
    unverified one if no verified one followed within UNVERIFIED_WAIT_S; None if none came. Answers are
    a queue, so a forged one cannot overwrite the enclave's, only stand before it."""
    key, end = answer_key(nonce), time.monotonic() + timeout
    doubt, doubted_since = None, 0.0
    while (now := time.monotonic()) < end and not (doubt and now - doubted_since >= UNVERIFIED_WAIT_S):
        try:
            got = read_answer(token, nonce, store.queue_pop(key, block=False))
        except QueueEmptyError:
            time.sleep(POLL_S)
            continue
        if got.verified:
            return got
        doubt, doubted_since = doubt or got, doubted_since or now
    return doubt


def answer_key(nonce: bytes) -> str:
    """The queue of answers to the request with `nonce` (queues are not listed by the store: only a
    peer that read the request knows it)."""
    return f"{PREFIX}accept/{nonce.hex()}"


def _open_link(store: TCPStore, token: bytes, slot: int, bind: str, address: str, timeout: float) -> PairTransport:
    lent = LentStore(store)
    try:
        group = pair_group(lent, slot, 1, timeout, bind)
        prove_link(group, token, slot, me=1, timeout=timeout)
    except RuntimeError as e:  # gloo's: no peer came, or it went away
        raise LinkProofError(f"no pair: {printable(' '.join(str(e).split()))}") from None
    finally:
        lent.take_back()
    # A reply may wait unread while the enclave waits on other workers or runs its own layers: the
    # worker's sends wait as long as the link lives (a dead enclave closes it).
    return PairTransport(group, me=1, peer=f"enclave at {address}", send_timeout=FOREVER_S)


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
        length, payload = torch.tensor([len(frame)], dtype=torch.int64), torch.frombuffer(frame, dtype=torch.uint8)
        self._sending = [(self._start("send", length, 0), length), (self._start("send", payload, 1), payload)]
        self.stats.bytes_sent += len(frame) + 8
        self.stats.messages_sent += 1

    def recv(self, timeout: float | None = None, *, payload_bytes: int | None = None) -> Message:
        """The next message; no `timeout`: wait as long as the link lives (a worker between jobs).

        `payload_bytes`: the message is a reply that may carry at most this many tensor bytes, so its
        announced length is held to that plus a small header before anything is allocated. The
        frame is received into one buffer, and the tensors decoded from it are views of it.
        """
        self.flush()
        timeout = FOREVER_S if timeout is None else timeout
        limit, max_header = self.max_message_bytes, MAX_HEADER_BYTES
        if payload_bytes is not None:
            limit, max_header = min(limit, reply_frame_bytes(payload_bytes)), REPLY_HEADER_BYTES
        length = torch.empty(1, dtype=torch.int64)
        self._wait("recv", self._start("recv", length, 0), timeout)
        n = int(length.item())
        if not 0 < n <= limit:
            raise ProtocolError(f"{self.peer} announced a {n}-byte message (limit {limit})")
        payload = torch.empty(n, dtype=torch.uint8)
        self._wait("recv", self._start("recv", payload, 1), timeout)
        self.stats.bytes_received += n + 8
        self.stats.messages_received += 1
        return decode(payload.numpy(), max_bytes=limit, max_header=max_header)

    def close(self) -> None:
        """Deliver what is still being sent, if the peer takes it; the group goes with its last reference."""
        try:
            self.flush()
        except (WorkerLostError, WorkerTimeoutError):
            pass
