"""The key-release handshake between the enclave (client) and the owner's key server.

One TCP connection, four length-prefixed JSON messages::

    enclave -> server   {"type": "hello", "version": 1}
    server  -> enclave  {"type": "challenge", "nonce": 32 random bytes}
    enclave -> server   {"type": "evidence", "public_key": X25519 public key, "evidence": {...}}
    server  -> enclave  {"type": "key", "server_public_key": ..., "nonce": ..., "wrapped": ...}
                     or {"type": "refused", "reason": "..."}

The evidence's report data must be :func:`.evidence.report_data` of this connection's challenge and
the enclave's ephemeral public key, so evidence recorded from another session, or presented with
another key, is refused. The data key is wrapped with AES-256-GCM under HKDF-SHA256 of the X25519
shared secret (salt: the challenge; the measurement in the associated data), so only the holder of
the ephemeral private key inside the attested enclave can unwrap it, and an answer replayed from
another session does not decrypt.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import AttestationError, ConfigError
from . import ledger
from .evidence import Attester, Evidence, report_data
from .framing import field, receive, send
from .ledger import Ledger, ledger_key
from .policy import Policy

VERSION = 1
_INFO = b"tempo/key-release/v1/wrap"


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _wrapping_key(own: X25519PrivateKey, other: bytes, challenge: bytes, client: bytes, server: bytes,
                  peer: str) -> AESGCM:
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(other))
    except ValueError:  # a low-order point: no shared secret (a peer trying to force a known one)
        raise AttestationError(f"{peer}'s X25519 public key is not usable") from None
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=challenge, info=_INFO + client + server).derive(shared))


# ---- the enclave's side ------------------------------------------------------------------------------

def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"a key server address is HOST:PORT, got {text!r}")
    return host, int(port)


def request_key(address: str, attester: Attester, *, timeout: float = 30.0) -> bytes:
    """Run the handshake with the key server at HOST:PORT; return the data key or raise AttestationError."""
    host, port = parse_address(address)
    peer = f"key server {address}"
    ephemeral = X25519PrivateKey.generate()
    public = _raw(ephemeral.public_key())
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            send(sock, {"type": "hello", "version": VERSION})
            challenge_message = receive(sock, peer)
            if challenge_message["type"] == "refused":
                raise AttestationError(f"{peer} refused: {challenge_message.get('reason')}")
            if challenge_message["type"] != "challenge":
                raise AttestationError(f"{peer} answered hello with {challenge_message['type']!r}")
            challenge = field(challenge_message, "nonce", peer, 32)
            evidence = attester.evidence(report_data(challenge, public))
            send(sock, {"type": "evidence", "public_key": public.hex(), "evidence": evidence.to_json()})
            answer = receive(sock, peer)
    except OSError as e:
        raise AttestationError(f"cannot reach {peer}: {e}") from None
    if answer["type"] == "refused":
        raise AttestationError(f"{peer} refused to release the key: {answer.get('reason')}")
    if answer["type"] != "key":
        raise AttestationError(f"{peer} answered the evidence with {answer['type']!r}")
    server = field(answer, "server_public_key", peer, 32)
    wrapping = _wrapping_key(ephemeral, server, challenge, public, server, peer)
    try:
        return wrapping.decrypt(field(answer, "nonce", peer, 12), field(answer, "wrapped", peer),
                                challenge + bytes.fromhex(evidence.measurement))
    except InvalidTag:
        raise AttestationError(f"{peer}'s wrapped key does not decrypt for this session: the answer was "
                               "replayed from another session or altered") from None


# ---- the owner's side --------------------------------------------------------------------------------

class KeyServer:
    """Releases `data_key` to enclaves whose evidence satisfies `policy`, and keeps their runs' checkpoint
    `ledger` (:mod:`.ledger`) if given; one thread per connection."""

    def __init__(self, data_key: bytes, policy: Policy, *, ledger: Ledger | None = None,
                 log: Callable[[str], None] = print, timeout: float = 30.0):
        self._key, self.policy, self._log, self._timeout = data_key, policy, log, timeout
        self._ledger, self._ledger_key = ledger, ledger_key(data_key)
        self._sock: socket.socket | None = None
        self.granted = self.refused = 0
        self._lock = threading.Lock()

    def bind(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0: any free port); returns the address actually bound."""
        self._sock = socket.create_server((host, port))
        return self._sock.getsockname()[:2]

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        assert self._sock is not None, "bind() first"
        self._sock.settimeout(0.2)
        while stop is None or not stop.is_set():
            try:
                conn, address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break  # closed
            threading.Thread(target=self._handle, args=(conn, f"{address[0]}:{address[1]}"), daemon=True).start()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def _handle(self, conn: socket.socket, peer: str) -> None:
        with conn:
            conn.settimeout(self._timeout)
            try:
                first = receive(conn, peer)
                if first["type"] in ledger.TYPES:
                    if self._ledger is None:
                        raise AttestationError("this key server keeps no checkpoint ledger")
                    self._log(ledger.serve(conn, peer, first, self._ledger_key, self._ledger))
                    return
                measurement = self._handshake(conn, peer, first)
            except AttestationError as e:
                self._count(granted=False)
                self._log(f"refused {peer}: {e}")
                try:
                    send(conn, {"type": "refused", "reason": str(e)})
                except OSError:
                    pass  # the peer is gone; the refusal is logged
            except OSError as e:
                self._count(granted=False)
                self._log(f"refused {peer}: connection failed: {e}")
            else:
                self._count(granted=True)
                self._log(f"released the data key to {peer} (measurement {measurement})")

    def _count(self, granted: bool) -> None:
        with self._lock:
            if granted:
                self.granted += 1
            else:
                self.refused += 1

    def _handshake(self, conn: socket.socket, peer: str, hello: dict) -> str:
        if hello["type"] != "hello" or hello.get("version") != VERSION:
            raise AttestationError(f"expected hello version {VERSION}, got {hello['type']!r} version "
                                   f"{hello.get('version')!r}")
        challenge = os.urandom(32)  # this connection's only challenge: evidence for any other is refused
        send(conn, {"type": "challenge", "nonce": challenge.hex()})
        message = receive(conn, peer)
        if message["type"] != "evidence":
            raise AttestationError(f"expected evidence, got {message['type']!r}")
        client = field(message, "public_key", peer, 32)
        evidence = Evidence.from_json(message.get("evidence"))
        if bytes.fromhex(evidence.report_data) != report_data(challenge, client):
            raise AttestationError("the evidence is not bound to this session's challenge and key: stale or replayed")
        self.policy.check(evidence)
        ephemeral = X25519PrivateKey.generate()
        server = _raw(ephemeral.public_key())
        wrapping = _wrapping_key(ephemeral, client, challenge, client, server, peer)
        nonce = os.urandom(12)
        wrapped = wrapping.encrypt(nonce, self._key, challenge + bytes.fromhex(evidence.measurement))
        send(conn, {"type": "key", "server_public_key": server.hex(), "nonce": nonce.hex(), "wrapped": wrapped.hex()})
        return evidence.measurement
