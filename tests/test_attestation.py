"""Attested key release: the key goes to expected code only, and every refusal is clear on both sides."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tempo.attestation import dev
from tempo.attestation.evidence import Evidence, report_data
from tempo.attestation.framing import receive as _receive
from tempo.attestation.framing import send as _send
from tempo.attestation.policy import Policy
from tempo.attestation.release import KeyServer, request_key
from tempo.errors import AttestationError, ConfigError
from tempo.sealed.stream import new_data_key, write_key_file
from test_cli import assert_one_line_error, invoke

DATA_KEY = new_data_key()


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dev") / "dev.pem"
    dev.create_signing_key(path)
    return path


@contextmanager
def serving(policy: Policy, ledger=None) -> Iterator[tuple[str, KeyServer, list[str]]]:
    """A key server with `policy` (and `ledger`) on a free loopback port: (address, server, its log)."""
    log: list[str] = []
    ks = KeyServer(DATA_KEY, policy, ledger=ledger, log=log.append, timeout=5)
    host, port = ks.bind("127.0.0.1", 0)
    stop = threading.Event()
    thread = threading.Thread(target=ks.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        yield f"{host}:{port}", ks, log
    finally:
        stop.set()
        thread.join()
        ks.close()


@pytest.fixture
def server(signing_key) -> Iterator[tuple[str, KeyServer, list[str]]]:
    """A key server that expects this Tempo's measurement and trusts the dev key."""
    public = dev.public_key_hex(dev.load_signing_key(signing_key))
    with serving(Policy(frozenset({("dev", dev.measure())}), frozenset({public}))) as running:
        yield running


def _attester(path: Path, measurement: str | None = None) -> dev.DevAttester:
    return dev.DevAttester(dev.load_signing_key(path), measurement)


def _request(address: str, attester) -> bytes:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        key = request_key(address, attester, timeout=5)
    assert any("proves NOTHING about hardware" in str(w.message) for w in caught)  # loud, every time
    return key


def _public() -> bytes:
    """Some valid X25519 public key (the attacker's own)."""
    return X25519PrivateKey.from_private_bytes(bytes(range(32))).public_key().public_bytes_raw()


def _wait_for(log: list[str], n: int) -> None:
    for _ in range(200):
        if len(log) >= n:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"the server logged {log}")


def test_the_expected_code_gets_the_key(server, signing_key):
    address, ks, log = server
    assert _request(address, _attester(signing_key)) == DATA_KEY
    _wait_for(log, 1)
    assert ks.granted == 1 and log[0].startswith("released the data key")


def test_a_wrong_measurement_is_refused_on_both_sides(server, signing_key):
    address, ks, log = server
    with pytest.raises(AttestationError, match=r"refused to release the key: measurement 0+ is not the expected"):
        _request(address, _attester(signing_key, "00" * 32))
    _wait_for(log, 1)
    assert ks.refused == 1 and "is not the expected one" in log[0]


def test_an_untrusted_dev_key_is_refused(server, tmp_path):
    address, _, _ = server
    dev.create_signing_key(tmp_path / "other.pem")
    with pytest.raises(AttestationError, match="does not trust"):
        _request(address, _attester(tmp_path / "other.pem"))


def test_evidence_replayed_into_another_session_is_refused(server, signing_key):
    """The attacker recorded a granted session's evidence; a new session has a new challenge."""
    address, ks, log = server
    host, port = address.rsplit(":", 1)
    attester, public = _attester(signing_key), _public()
    recorded = None
    for attempt in range(2):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            _send(sock, {"type": "hello", "version": 1})
            challenge = bytes.fromhex(_receive(sock, "server")["nonce"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                evidence = recorded or attester.evidence(report_data(challenge, public))
            _send(sock, {"type": "evidence", "public_key": public.hex(), "evidence": evidence.to_json()})
            answer = _receive(sock, "server")
        recorded = evidence
        assert answer["type"] == ("key" if attempt == 0 else "refused")
    assert "stale or replayed" in answer["reason"]
    _wait_for(log, 2)
    assert ks.granted == 1 and ks.refused == 1


def test_an_answer_replayed_from_another_session_does_not_unwrap(server, signing_key):
    """A man in the middle replays a key server's earlier answer: the enclave's fresh key cannot open it."""
    address, _, _ = server
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:  # a session the attacker watched
        _send(sock, {"type": "hello", "version": 1})
        challenge = bytes.fromhex(_receive(sock, "server")["nonce"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evidence = _attester(signing_key).evidence(report_data(challenge, _public()))
        _send(sock, {"type": "evidence", "public_key": _public().hex(), "evidence": evidence.to_json()})
        old_answer = _receive(sock, "server")

    fake = socket.create_server(("127.0.0.1", 0))

    def replay() -> None:
        conn, _ = fake.accept()
        with conn:
            _receive(conn, "enclave")
            _send(conn, {"type": "challenge", "nonce": challenge.hex()})
            _receive(conn, "enclave")
            _send(conn, old_answer)

    thread = threading.Thread(target=replay, daemon=True)
    thread.start()
    with pytest.raises(AttestationError, match="does not decrypt for this session"):
        _request(f"127.0.0.1:{fake.getsockname()[1]}", _attester(signing_key))
    thread.join()
    fake.close()


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x00\x00\x00\x05hello", b"\x00\x00\x00\x02{}"])
def test_malformed_messages_are_refused_and_the_server_keeps_serving(server, signing_key, garbage):
    address, ks, log = server
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(garbage)
        answer = _receive(sock, "server")
    assert answer["type"] == "refused" and answer["reason"]
    assert _request(address, _attester(signing_key)) == DATA_KEY
    _wait_for(log, 2)
    assert ks.refused == 1 and ks.granted == 1


def test_a_low_order_public_key_is_refused(server, signing_key):
    address, _, _ = server
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        _send(sock, {"type": "hello", "version": 1})
        challenge = bytes.fromhex(_receive(sock, "server")["nonce"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evidence = _attester(signing_key).evidence(report_data(challenge, bytes(32)))
        _send(sock, {"type": "evidence", "public_key": bytes(32).hex(), "evidence": evidence.to_json()})
        answer = _receive(sock, "server")
    assert answer["type"] == "refused" and "public key is not usable" in answer["reason"]


def test_malformed_evidence_is_named():
    with pytest.raises(AttestationError, match="64 bytes of hex report_data"):
        Evidence.from_json({"backend": "dev", "measurement": "ab", "report_data": "00"})


def test_an_unreachable_key_server_is_a_clear_error(signing_key):
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(AttestationError, match="cannot reach key server"):
        request_key(f"127.0.0.1:{port}", _attester(signing_key), timeout=2)


def test_the_measurement_changes_with_the_code(tmp_path):
    package = tmp_path / "tempo"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    before = dev.measure(package)
    (package / "a.py").write_text("x = 2\n")
    assert dev.measure(package) != before and len(before) == 64


def test_keyserver_and_measure_commands(tmp_path, signing_key):
    r = invoke("measure", "--dev-key", str(tmp_path / "k.pem"))
    assert r.returncode == 0, r.stderr
    measurement = re.search(r"measurement ([0-9a-f]{64})", r.stdout).group(1)
    public = re.search(r"public key ([0-9a-f]{64})", r.stdout).group(1)
    assert measurement == dev.measure() and "proves NOTHING" in r.stderr
    write_key_file(tmp_path / "data.key", DATA_KEY)

    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    process = subprocess.Popen([sys.executable, "-m", "tempo.cli", "keyserver", "--key", str(tmp_path / "data.key"),
                                "--expect", f"dev:{measurement}", "--dev-trust", public, "--listen",
                                f"127.0.0.1:{port}"],
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if "listening on" in line:
                break
        assert _request(f"127.0.0.1:{port}", _attester(tmp_path / "k.pem")) == DATA_KEY
        assert "released the data key" in process.stderr.readline()
    finally:
        process.terminate()
        process.wait(timeout=10)

    assert_one_line_error(invoke("keyserver", "--key", str(tmp_path / "data.key"), "--expect", "dev:xyz"), 2,
                          "is not a hex measurement")


def test_hardware_evidence_is_checked_against_the_key_servers_vendor_roots():
    """The whole handshake with a TDX quote (built here: no TDX hardware) chained to the server's root."""
    from tempo.attestation import dcap
    from test_attestation_dcap import TDX_MEASUREMENT, Build, make_pki, make_quote

    intel, impostor = make_pki(), make_pki("Not Intel")
    with serving(Policy(frozenset({("tdx", TDX_MEASUREMENT)}), roots=(intel.root,))) as (address, ks, log):
        genuine = dcap.TdxAttester(lambda data: make_quote(intel, "tdx", Build(report_data=data)))
        assert request_key(address, genuine, timeout=5) == DATA_KEY
        forged = dcap.TdxAttester(lambda data: make_quote(impostor, "tdx", Build(report_data=data)))
        with pytest.raises(AttestationError, match="refused to release the key"):
            request_key(address, forged, timeout=5)
        _wait_for(log, 2)
        assert ks.granted == 1 and ks.refused == 1
    with serving(Policy(frozenset({("dev", TDX_MEASUREMENT)}), frozenset({"00" * 32}))) as (address, _, _):
        with pytest.raises(AttestationError, match="no vendor root"):
            request_key(address, genuine, timeout=5)


def test_the_keyserver_command_needs_a_root_of_trust(tmp_path):
    write_key_file(tmp_path / "data.key", DATA_KEY)
    assert_one_line_error(invoke("keyserver", "--key", str(tmp_path / "data.key"), "--expect", "sgx:ab"), 2,
                          "give --trust-root")
    (tmp_path / "root.pem").write_text("not a certificate")
    assert_one_line_error(invoke("keyserver", "--key", str(tmp_path / "data.key"), "--expect", "sgx:ab",
                                 "--trust-root", str(tmp_path / "root.pem")), 2, "holds no PEM certificate")


def test_dev_evidence_claiming_a_hardware_measurement_is_refused(signing_key):
    """Measurements are pinned to their backend: a dev key's signature over the SGX MRENCLAVE is not SGX
    evidence, even where the dev key is trusted for its own measurement."""
    mrenclave = "5a" * 32
    public = dev.public_key_hex(dev.load_signing_key(signing_key))
    with serving(Policy(frozenset({("dev", dev.measure())}), frozenset({public}))) as (address, _, _):
        with pytest.raises(AttestationError, match=f"{mrenclave} is not the expected one for backend dev"):
            _request(address, _attester(signing_key, mrenclave))
    from test_attestation_dcap import make_pki

    policy = Policy(frozenset({("sgx", mrenclave)}), roots=(make_pki().root,))
    evidence = Evidence("dev", mrenclave, "00" * 64, {"public_key": public, "signature": "00" * 64})
    with pytest.raises(AttestationError, match="does not accept the dev backend"):
        policy.check(evidence)


def test_a_key_server_trusting_both_hardware_roots_and_dev_keys_is_refused_at_start(tmp_path):
    from test_attestation_dcap import make_pki

    with pytest.raises(ConfigError, match="not both"):
        Policy(frozenset({("sgx", "5a" * 32)}), frozenset({"00" * 32}), (make_pki().root,))
    write_key_file(tmp_path / "data.key", DATA_KEY)
    (tmp_path / "root.pem").write_bytes(make_pki().root.public_bytes(serialization.Encoding.PEM))
    assert_one_line_error(invoke("keyserver", "--key", str(tmp_path / "data.key"), "--expect", "sgx:" + "5a" * 32,
                                 "--trust-root", str(tmp_path / "root.pem"), "--dev-trust", "00" * 32), 2,
                          "--trust-root", "--dev-trust", "not both")


@pytest.mark.parametrize(("expect", "problem"), [
    ("5a" * 32, "names no backend: write BACKEND:MEASUREMENT"),
    ("sgz:" + "5a" * 32, "unknown backend 'sgz'"),
    ("tdx:" + "5a" * 32, "needs --trust-root"),
])
def test_expected_measurements_name_their_backend(tmp_path, expect, problem):
    write_key_file(tmp_path / "data.key", DATA_KEY)
    assert_one_line_error(invoke("keyserver", "--key", str(tmp_path / "data.key"), "--expect", expect,
                                 "--dev-trust", "00" * 32), 2, problem)
