"""Hostile peers at the join (issue 16, findings 1 and 2 and the lows on tokens and names): whoever reaches
the rendezvous without the token gets no link and no job, cannot crash or stall the join, and its strings
reach the log escaped."""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed import QueueEmptyError, TCPStore

from tempo.errors import ConfigError
from tempo.training.config import TrainConfig
from tempo.training.loop import train
from tempo.wire.dist import (
    CHALLENGE_KEY,
    JOINS_KEY,
    LINK_TAG,
    VERSION_KEY,
    answer_key,
    connect,
    pair_group,
    prove_link,
    read_token,
)
from tempo.wire.join import (
    MAX_NAME_CHARS,
    MAX_REQUEST_BYTES,
    OK,
    REFUSED,
    JoinRequest,
    answer,
    fields,
    join_proof,
    link_proof,
    mac,
    parse_request,
    read_answer,
    request,
)
from tempo.wire.messages import PROTOCOL_VERSION, Shutdown
from test_remote_workers import TOKEN, _free_port, _pool, _worker

README = Path(__file__).resolve().parents[1] / "README.md"
SETTLE_S = 60.0  # the most any wait below may take before the test gives up


def _until(condition, what: str) -> None:
    """Wait for `condition` (the join runs in other threads and processes); fail naming `what`."""
    end = time.monotonic() + SETTLE_S
    while not condition():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.05)


def _client(address: str) -> TCPStore:
    host, port = address.rsplit(":", 1)
    return TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=30))


def _token_file(tmp_path: Path, token: bytes = TOKEN) -> Path:
    path = tmp_path / "token"
    path.write_bytes(token)
    path.chmod(0o600)
    return path


def _push_valid_request(store: TCPStore, name: str) -> int:
    """What a token holder sends; returns the slot of the enclave's (verified) answer."""
    nonce = os.urandom(32)
    challenge = bytes.fromhex(store.get(CHALLENGE_KEY).decode())
    store.queue_push(JOINS_KEY, request(PROTOCOL_VERSION, name, nonce, join_proof(TOKEN, PROTOCOL_VERSION,
                                                                                  challenge, nonce)))
    got: list[bytes] = []

    def popped() -> bool:
        try:
            got.append(store.queue_pop(answer_key(nonce), block=False))
        except QueueEmptyError:
            return False
        return True

    _until(popped, "the enclave's answer")
    _, slot, verdict = got[0].decode().split(" ", 2)
    assert verdict == OK
    return int(slot)


# Finding 1: link hijack without the token


def test_a_peer_without_the_token_on_an_accepted_pair_gets_no_job_and_the_worker_joins_again(tmp_path):
    """A stranger that won the race for rank 1 of an accepted slot's pair (the store tells it the slot)
    cannot prove the token on the link: the enclave drops that pair, does not count it, sends it nothing,
    and the honest worker joins under a new slot."""
    address, log = f"127.0.0.1:{_free_port()}", []
    thread, made = _pool(1, address, log)
    _until(lambda: any("waiting for 1 worker" in line for line in log), "the rendezvous is up")
    store = _client(address)
    slot = _push_valid_request(store, "honest")  # the honest worker's request; the rogue takes its pair
    rogue = pair_group(store, slot, 1, 30, "127.0.0.1")
    rogue.recv([torch.empty(32, dtype=torch.uint8)], 0, LINK_TAG).wait()  # the enclave's nonce
    rogue.send([torch.randint(0, 255, (64,), dtype=torch.uint8)], 0, LINK_TAG).wait()  # a guessed proof
    _until(lambda: any(f"dropped the pair of slot {slot}" in line for line in log), "the rogue's pair dropped")
    worker = _worker(address, _token_file(tmp_path), "honest")
    thread.join(timeout=SETTLE_S)
    pool = made["pool"]
    try:
        assert pool.joined == ["honest"] and pool.size == 1
        assert f"(slot {slot + 1}) joined (1/1)" in log[-1]
        length = torch.empty(1, dtype=torch.int64)
        with pytest.raises(RuntimeError):  # no job ever comes: its pair is gone
            rogue.recv([length], 0, 0).wait(datetime.timedelta(seconds=5))
    finally:
        pool.close()
    assert worker.wait(timeout=30) == 0


class FakeEnclave:
    """A rendezvous the test scripts: to show what a worker does with each kind of answer."""

    def __init__(self) -> None:
        self.store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=30))
        self.address = f"127.0.0.1:{self.store.port}"
        self.challenge = os.urandom(32)
        self.store.set(VERSION_KEY, str(PROTOCOL_VERSION))
        self.store.set(CHALLENGE_KEY, self.challenge.hex())

    def next_request(self) -> dict:
        raw: list[bytes] = []

        def popped() -> bool:
            try:
                raw.append(self.store.queue_pop(JOINS_KEY, block=False))
            except QueueEmptyError:
                return False
            return True

        _until(popped, "a join request")
        return json.loads(raw[0])

    def answer(self, req: dict, slot: int, verdict: str, *, token: bytes = TOKEN) -> None:
        nonce = bytes.fromhex(req["nonce"])
        self.store.queue_push(answer_key(nonce), answer(token, nonce, slot, verdict))


def _connect_in_thread(address: str, notes: list[str], timeout: float = 30) -> dict:
    result: dict = {}

    def run() -> None:
        try:
            result["link"] = connect(address, TOKEN, "w", timeout=timeout, notice=notes.append)
        except Exception as e:  # handed to the test thread
            result["error"] = e

    result["thread"] = threading.Thread(target=run, daemon=True)
    result["thread"].start()
    return result


def test_a_worker_serves_no_peer_that_cannot_prove_the_token_as_the_enclave():
    """Rank 0 of an accepted pair taken by an impostor (who answers the worker's link proof with a guess):
    the worker drops that pair and asks again; it never treats the impostor as its enclave."""
    fake, notes = FakeEnclave(), []
    result = _connect_in_thread(fake.address, notes)
    fake.answer(fake.next_request(), 1, OK)  # the genuine enclave's answer ...
    impostor = pair_group(fake.store, 1, 0, 30, "127.0.0.1")  # ... but an impostor holds rank 0
    impostor.send([torch.zeros(32, dtype=torch.uint8)], 1, LINK_TAG).wait()
    impostor.recv([torch.empty(64, dtype=torch.uint8)], 1, LINK_TAG).wait()  # the worker's proof: useless here
    impostor.send([torch.zeros(32, dtype=torch.uint8)], 1, LINK_TAG).wait()  # a guessed enclave proof
    fake.next_request()  # the worker asks again under a new slot
    assert any("the pair of slot 1 failed" in n and "it is not the enclave" in n for n in notes), notes
    assert "link" not in result


def test_forged_answers_neither_refuse_nor_admit_a_worker():
    """Answers without the token's MAC (a stranger's refusal or 'ok') are skipped; the enclave's answer
    behind them counts, and the worker joins over a link both sides proved."""
    fake, notes = FakeEnclave(), []
    result = _connect_in_thread(fake.address, notes)
    req = fake.next_request()
    fake.answer(req, 1, REFUSED + "go away", token=b"a-stranger-without-the-job-token-xx")
    fake.answer(req, 1, OK, token=b"a-stranger-without-the-job-token-xx")
    fake.answer(req, 2, OK)
    group = pair_group(fake.store, 2, 0, 30, "127.0.0.1")
    prove_link(group, TOKEN, 2, me=0, timeout=30)
    result["thread"].join(timeout=SETTLE_S)
    assert "error" not in result, result.get("error")
    result["link"].send(Shutdown())  # the link works
    received = torch.empty(1, dtype=torch.int64)
    group.recv([received], 1, 0).wait(datetime.timedelta(seconds=30))
    assert received.item() > 0


def test_only_refusals_signed_with_the_token_end_a_join_at_once():
    fake, notes = FakeEnclave(), []
    result = _connect_in_thread(fake.address, notes)
    fake.answer(fake.next_request(), 1, REFUSED + "protocol version 9; this enclave speaks 3")
    result["thread"].join(timeout=SETTLE_S)
    assert isinstance(result["error"], ConfigError)
    assert "refused this worker: protocol version 9; this enclave speaks 3" in str(result["error"])

    fake, notes = FakeEnclave(), []
    result = _connect_in_thread(fake.address, notes)
    for slot in range(1, 4):  # unsigned: another token, or a forger; asked three times, then given up
        fake.answer(fake.next_request(), slot, REFUSED + "wrong token", token=b"another-token-0123456789abcdefghij")
    result["thread"].join(timeout=SETTLE_S)
    assert isinstance(result["error"], ConfigError)
    assert "refused this worker: wrong token (3 answers not signed with this worker's token" in str(result["error"])
    assert len(notes) == 1 and "cannot verify" in notes[0]


def test_proofs_are_length_prefixed_and_bound_to_their_purpose():
    """The old proof hashed challenge || str(slot): slot 12 under challenge c equalled slot 2 under c + '1'."""
    assert fields(b"ab", b"c") != fields(b"a", b"bc") and fields("1", 2) != fields("12")
    assert mac(TOKEN, "x", b"c1", 2) != mac(TOKEN, "x", b"c", 12)
    en, wn = os.urandom(32), os.urandom(32)
    assert link_proof(TOKEN, "worker", 1, en, wn) != link_proof(TOKEN, "enclave", 1, en, wn)
    assert link_proof(TOKEN, "worker", 1, en, wn) != link_proof(TOKEN, "worker", 12, en, wn)
    assert join_proof(TOKEN, 3, en, wn) != link_proof(TOKEN, "worker", 3, en, wn).hex()


# Finding 2: outsiders crash or stall the join


def test_strangers_requests_neither_crash_nor_stall_the_join_and_a_worker_still_joins(tmp_path):
    """Old-style attacks on the keys (a reserved slot never written, a non-ASCII proof, a poisoned
    counter) and malformed, deep, huge and ill-typed requests through the queue: each is refused or
    ignored, none raises in the enclave, and a valid worker joins at once."""
    address, log = f"127.0.0.1:{_free_port()}", []
    thread, made = _pool(1, address, log)
    _until(lambda: any("waiting for 1 worker" in line for line in log), "the rendezvous is up")
    stranger = _client(address)
    stranger.add("tempo/joins", 1)  # the old protocol's slot reservation, never written
    stranger.set("tempo/join/2", json.dumps({"version": PROTOCOL_VERSION, "name": "x", "proof": "é" * 64}))
    stranger.set("tempo/joins", "not a number")
    for raw in [json.dumps({"version": PROTOCOL_VERSION, "name": "x", "nonce": "00" * 32, "proof": "é" * 64}),
                "[" * 100_000 + "]" * 100_000, b"\xff\xfe", "x" * (4 << 20), "{}", "null",
                json.dumps({"version": True, "name": "x", "nonce": "00" * 32, "proof": "00" * 32}),
                json.dumps({"version": 10 ** 400, "name": "x", "nonce": "00" * 32, "proof": "00" * 32}),
                json.dumps({"version": PROTOCOL_VERSION, "name": ["x"], "nonce": "00" * 32, "proof": "00" * 32})]:
        stranger.queue_push(JOINS_KEY, raw)
    worker = _worker(address, _token_file(tmp_path), "honest")
    thread.join(timeout=SETTLE_S)
    assert "error" not in made, made.get("error")
    pool = made["pool"]
    try:
        assert pool.joined == ["honest"]
        refusals = [line for line in log if line.startswith("refused the worker")]
        assert len(refusals) == 9 and sum("a malformed join request" in r for r in refusals) == 7
        assert sum("a join request of" in r for r in refusals) == 2
    finally:
        pool.close()
    assert worker.wait(timeout=30) == 0


def test_the_rendezvous_closes_once_the_workers_have_joined(tmp_path):
    """From then on nothing the network sends reaches an enclave store (during the join it can still
    fill one: docs/faults.md)."""
    address, log = f"127.0.0.1:{_free_port()}", []
    thread, made = _pool(1, address, log)
    worker = _worker(address, _token_file(tmp_path), "honest")
    thread.join(timeout=SETTLE_S)
    pool = made["pool"]
    try:
        host, port = address.rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
    finally:
        pool.close()
    assert worker.wait(timeout=30) == 0


# Lows: token files, peer strings in logs


def test_token_files_need_32_bytes_and_warn_when_others_can_read_them(tmp_path):
    short = _token_file(tmp_path, b"x" * 31)
    with pytest.raises(ConfigError, match=r"at least 32 .*umask 077; head -c 32 /dev/urandom \| base64 > token"):
        read_token(short)
    path = _token_file(tmp_path)
    for mode, who in [(0o644, "others"), (0o640, "its group")]:
        path.chmod(mode)
        with pytest.warns(UserWarning, match=f"readable by {who}"):
            assert read_token(path) == TOKEN
    path.chmod(0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_token(path) == TOKEN


def test_the_readme_recipe_makes_a_private_token_file(tmp_path):
    recipe = next(line for line in README.read_text().splitlines() if "/dev/urandom" in line and "> token" in line)
    subprocess.run(["bash", "-c", recipe], cwd=tmp_path, check=True)
    assert (tmp_path / "token").stat().st_mode & 0o077 == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_token(tmp_path / "token")) >= 32


def test_peer_names_reach_the_log_without_control_characters(tmp_path):
    address, log = f"127.0.0.1:{_free_port()}", []
    thread, made = _pool(1, address, log)
    _until(lambda: any("waiting for 1 worker" in line for line in log), "the rendezvous is up")
    evil = "\x1b[2J\x1b[31mroot\r\nlogin:"
    _client(address).queue_push(JOINS_KEY, request(PROTOCOL_VERSION, evil, os.urandom(32), "00" * 32))
    worker = _worker(address, _token_file(tmp_path), evil)
    thread.join(timeout=SETTLE_S)
    pool = made["pool"]
    try:
        assert pool.joined == [evil]
        assert any("wrong token" in line and "\\x1b[2J" in line for line in log)
        assert any("\\x1b[31mroot\\r\\nlogin:' (slot 2) joined" in line for line in log)
        assert not any(c in line for line in log for c in "\x1b\r\n")
    finally:
        pool.close()
    assert worker.wait(timeout=30) == 0


# The join request parser and the answer reader, fuzzed: a refusal or a valid value, nothing else

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=4), max_leaves=16)
REQUEST_LIKE = st.fixed_dictionaries({
    "version": st.just(PROTOCOL_VERSION) | JSONISH, "name": st.text(max_size=80) | JSONISH,
    "nonce": st.binary(min_size=32, max_size=32).map(bytes.hex) | st.text(max_size=70) | JSONISH,
    "proof": st.binary(min_size=32, max_size=32).map(bytes.hex) | st.text(max_size=70) | JSONISH,
}, optional={"extra": JSONISH})


@given(st.binary(max_size=1024) | JSONISH.map(lambda v: json.dumps(v).encode())
       | REQUEST_LIKE.map(lambda v: json.dumps(v, ensure_ascii=False).encode()))
@settings(max_examples=400, deadline=None)
def test_any_bytes_parse_to_a_valid_request_or_a_refusal(raw):
    got = parse_request(raw)
    if isinstance(got, JoinRequest):
        assert type(got.version) is int and len(got.name) <= MAX_NAME_CHARS and len(got.nonce) == 32
        assert len(bytes.fromhex(got.proof)) == 32 and len(raw) <= MAX_REQUEST_BYTES
    else:
        assert isinstance(got, str) and got


def test_the_longest_name_a_worker_may_send_fits_in_a_request():
    nonce, proof = os.urandom(32), "ab" * 32
    got = parse_request(request(PROTOCOL_VERSION, "\U0001f600" * 100, nonce, proof).encode())
    assert got == JoinRequest(PROTOCOL_VERSION, "\U0001f600" * MAX_NAME_CHARS, nonce, proof)


@given(st.binary(max_size=1024))
@settings(max_examples=200, deadline=None)
def test_any_bytes_read_as_an_answer_give_an_unverified_answer(raw):
    assert read_answer(TOKEN, b"n" * 32, raw).verified is False


def test_parsing_a_huge_request_allocates_nothing_of_its_size():
    for raw in [b"[" * (32 << 20), b"9" * (32 << 20), json.dumps({"name": "x" * (32 << 20)}).encode()]:
        tracemalloc.start()
        try:
            reason = parse_request(raw)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert reason == f"a join request of {len(raw)} bytes (limit {MAX_REQUEST_BYTES})" and peak < 64 << 10


# End to end: a rogue during a real `tempo train --listen` run

ROGUE = r"""
import datetime, json, os, sys, time, torch
from torch.distributed import DistError, QueueEmptyError
from tempo.wire.dist import JOINS_KEY, answer_key, pair_group, reach
from tempo.wire.join import request
from tempo.wire.messages import PROTOCOL_VERSION

store = reach(sys.argv[1], time.monotonic() + 120)
print("ready", flush=True)  # the honest workers start now: the join is open
report = {"forged": 0, "pair": None, "jobs": 0}
mine = os.urandom(32)
store.queue_push(JOINS_KEY, request(PROTOCOL_VERSION, "rogue", mine, "00" * 32))  # a guessed proof
for slot in range(1, 5):  # the old protocol's answer keys
    store.set(f"tempo/accept/{slot}", "refused: go away")
seen, end = {mine}, time.monotonic() + 30


def take_a_pair(slot):
    # rank 1 of the enclave's pair for `slot`; then wait for a job, as a worker would
    report["pair"] = slot
    try:
        group = pair_group(store, slot, 1, 10, "127.0.0.1")
        group.recv([torch.empty(1, dtype=torch.int64)], 0, 0).wait(datetime.timedelta(seconds=20))
        report["jobs"] += 1
    except RuntimeError:
        pass


try:
    while time.monotonic() < end and report["pair"] is None:
        try:  # read each honest request, forge a refusal (and an 'ok') into its answers, put it back
            raw = store.queue_pop(JOINS_KEY, block=False)
            nonce = bytes.fromhex(json.loads(raw)["nonce"])
            if nonce not in seen:
                seen.add(nonce)
                store.queue_push(answer_key(nonce), "00" * 32 + " 1 refused: wrong token")
                store.queue_push(answer_key(nonce), "00" * 32 + " 1 ok")
                report["forged"] += 1
            store.queue_push(JOINS_KEY, raw)
        except QueueEmptyError:
            pass
        links = [key for key in store.list_keys() if key.startswith("tempo/link/")]
        if links:  # race for rank 1 of the first pair the enclave opens
            take_a_pair(int(links[0].split("/")[2]))
        time.sleep(0.005)
except DistError:  # the enclave closed its rendezvous: the join is over
    report["closed"] = True
print(json.dumps(report))
"""
RUN = ["--model", "small_cnn", "--train-subset", "256", "--test-subset", "100", "--batch-size", "64",
       "--epochs", "1", "--seed", "3", "--no-progress"]


def _outcome(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str, str]:
    """A process's exit code and output; None (and the process killed) if it did not end within `timeout`."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def test_a_rogue_during_a_real_run_gets_no_link_and_the_run_ends_with_the_fault_free_model(tmp_path):
    token, address = _token_file(tmp_path), f"127.0.0.1:{_free_port()}"
    trainer = subprocess.Popen([sys.executable, "-m", "tempo.cli", "train", "--listen", address, "--workers", "2",
                                "--token-file", str(token), "--out", str(tmp_path / "run"), *RUN],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rogue = subprocess.Popen([sys.executable, "-c", ROGUE, address], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert rogue.stdout.readline() == "ready\n"
    workers = [_worker(address, token, f"gpu-{i}") for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(model="small_cnn", train_subset=256, test_subset=100, batch_size=64, epochs=1, seed=3,
                          in_process_workers=True, workers=2, progress=False, out=tmp_path / "plain"),
              log=lambda _: None)
    code, out, err = _outcome(trainer, 300)
    ends = [_outcome(w, 30) for w in workers]
    assert code == 0, err + "".join(worker_err for _, _, worker_err in ends)
    assert [worker_code for worker_code, _, _ in ends] == [0, 0], ends
    rogue_code, rogue_out, rogue_err = _outcome(rogue, 60)
    assert rogue_code == 0, rogue_err
    report = json.loads(rogue_out.splitlines()[-1])
    assert report["jobs"] == 0, report
    assert "wrong token (it calls itself 'rogue')" in out + err and "joined (2/2)" in out + err
    assert sorted(re.findall(r"worker '(gpu-\d)' \(slot \d+\) joined", out + err)) == ["gpu-0", "gpu-1"]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]
              for run in ("run", "plain")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    remote, plain = (torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("run", "plain"))
    for name, value in plain.items():
        torch.testing.assert_close(remote[name], value, rtol=1e-4, atol=1e-5)
