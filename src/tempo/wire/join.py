"""The join protocol's messages and proofs, both sides: what a worker writes, what the enclave answers.

Every proof is an HMAC-SHA256 under the job's token over *length-prefixed* fields led by a label
that names its purpose, so no two proofs (or two field splits) ever share an input: a proof for
slot 1 says nothing about slot 12, and a join proof is no link proof.

The rendezvous store is writable by anyone who reaches it, so nothing read from it is trusted:
a join request is parsed strictly (bounded size, exact types, never an exception), and an answer
counts only when it carries a MAC over the worker's fresh nonce. The link itself is then proved in
both directions over the established pair (:mod:`tempo.wire.dist`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

MAX_REQUEST_BYTES = 1024  # a request is ~250 bytes (~640 with 64 escaped non-ASCII name characters)
MAX_NAME_CHARS = 64
NONCE_BYTES = 32
MAC_BYTES = 32
OK = "ok"
REFUSED = "refused: "
WRONG_TOKEN = "wrong token"


def fields(*parts: bytes | str | int) -> bytes:
    """`parts` as one unambiguous byte string: each as an 8-byte big-endian length, then its bytes."""
    out = bytearray()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out += len(data).to_bytes(8, "big") + data
    return bytes(out)


def mac(token: bytes, label: str, *parts: bytes | str | int) -> bytes:
    """HMAC-SHA256 under the token over the label and `parts`, length-prefixed."""
    return hmac.new(token, fields(label, *parts), hashlib.sha256).digest()


def join_proof(token: bytes, version: int, challenge: bytes, nonce: bytes) -> str:
    """The worker's cheap pre-join proof: a filter against strangers, not the link's security (the
    challenge it covers is read from the store)."""
    return mac(token, "tempo-join", version, challenge, nonce).hex()


def answer(token: bytes, nonce: bytes, slot: int, verdict: str) -> str:
    """The enclave's answer to the request with `nonce`: the slot it got, `verdict` (``ok`` or
    ``refused: ...``) and a MAC over all three, so that only the enclave, and only for this request,
    writes an answer that counts."""
    return f"{mac(token, 'tempo-answer', nonce, slot, verdict).hex()} {slot} {verdict}"


@dataclass(frozen=True)
class Answer:
    slot: int
    verdict: str
    verified: bool  # False: only a hint (the enclave holds another token, or someone else wrote it)


def read_answer(token: bytes, nonce: bytes, raw: bytes) -> Answer:
    """An answer read from the store, checked against the token and the request's nonce; never raises."""
    tag, _, rest = raw[:MAX_REQUEST_BYTES].decode("ascii", errors="replace").partition(" ")
    slot, _, verdict = rest.partition(" ")
    if not slot.isdigit() or len(slot) > 18:
        return Answer(0, verdict, False)
    try:
        verified = hmac.compare_digest(bytes.fromhex(tag), mac(token, "tempo-answer", nonce, int(slot), verdict))
    except ValueError:
        verified = False
    return Answer(int(slot), verdict, verified)


def link_proof(token: bytes, side: str, slot: int, enclave_nonce: bytes, worker_nonce: bytes) -> bytes:
    """Proof over the established pair that `side` (``worker`` or ``enclave``) holds the token, bound to
    the slot and to both sides' fresh nonces."""
    return mac(token, f"tempo-link-{side}", slot, enclave_nonce, worker_nonce)


@dataclass(frozen=True)
class JoinRequest:
    version: int
    name: str
    nonce: bytes
    proof: str


def request(version: int, name: str, nonce: bytes, proof: str) -> str:
    return json.dumps({"version": version, "name": name[:MAX_NAME_CHARS], "nonce": nonce.hex(), "proof": proof})


def _hex(value: object, n: int) -> bytes | None:
    if not isinstance(value, str) or len(value) != 2 * n or not value.isascii():
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def parse_request(raw: bytes) -> JoinRequest | str:
    """A join request read from the store, or the reason it is refused. Never raises: the bytes come
    from anyone who reaches the rendezvous. Size is checked before parsing, so nesting depth and
    number sizes are bounded by it."""
    if len(raw) > MAX_REQUEST_BYTES:
        return f"a join request of {len(raw)} bytes (limit {MAX_REQUEST_BYTES})"
    try:
        value = json.loads(raw.decode("ascii"))
    except (ValueError, RecursionError):
        return "a malformed join request"
    if not isinstance(value, dict) or set(value) != {"version", "name", "nonce", "proof"}:
        return "a malformed join request"
    version, name = value["version"], value["name"]
    nonce, proof = _hex(value["nonce"], NONCE_BYTES), value["proof"]
    if type(version) is not int or not 0 <= version < 1 << 31 or not isinstance(name, str) \
            or len(name) > MAX_NAME_CHARS or nonce is None or _hex(proof, MAC_BYTES) is None:
        return "a malformed join request"
    return JoinRequest(version, name, nonce, proof)


def proof_holds(token: bytes, req: JoinRequest, challenge: bytes) -> bool:
    return hmac.compare_digest(req.proof, join_proof(token, req.version, challenge, req.nonce))
