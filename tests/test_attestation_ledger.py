"""The checkpoint ledger against a network attacker: forged, replayed, blocked or off-by-a-step answers
never let a run go on past a checkpoint the key server did not record, nor resume from a rolled-back one."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch

from tempo.attestation.framing import receive, send
from tempo.attestation.ledger import Entry, Ledger, LedgerClient, _tag, ledger_key
from tempo.attestation.policy import Policy
from tempo.errors import AttestationError
from tempo.sealed.checkpoints import SealedCheckpoints
from tempo.sealed.stream import new_data_key, new_run_id, write_key_file
from tempo.training.checkpoints import CheckpointError
from test_attestation import DATA_KEY, serving
from test_cli import assert_one_line_error, invoke

D1, D2, D3 = "d1" * 32, "d2" * 32, "d3" * 32
NO_RELEASE = Policy(frozenset(), frozenset({"00" * 32}))  # these servers only keep the ledger


@contextmanager
def ledger_server(path: Path, rewinds: tuple[tuple[str, int], ...] = ()) -> Iterator[str]:
    with serving(NO_RELEASE, Ledger(path, rewinds=rewinds)) as (address, _, _):
        yield address


def exchange(address: str, message: dict) -> dict:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        send(sock, message)
        return receive(sock, "key server")


@contextmanager
def intercepting(handle: Callable[[socket.socket, dict], None]) -> Iterator[str]:
    """A network attacker in the key server's place: each connection (in a thread of its own) goes to `handle`
    with its first message; the connection is closed when `handle` returns."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def one(conn: socket.socket) -> None:
        with conn:
            handle(conn, receive(conn, "enclave"))

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        server.close()


def attacker(answer: Callable[[dict], dict | None]) -> AbstractContextManager[str]:
    """`answer` gets each request; its return is sent back (None: closed unanswered, as a blocked report)."""

    def handle(conn: socket.socket, message: dict) -> None:
        reply = answer(message)
        if reply is not None:
            send(conn, reply)

    return intercepting(handle)


def client(address: str, run_id: str = "run-1", key: bytes = DATA_KEY) -> LedgerClient:
    return LedgerClient(address, key, run_id, timeout=5)


def test_the_ledger_moves_only_from_the_entry_it_holds_and_only_for_the_key_holder(tmp_path):
    with ledger_server(tmp_path / "ledger.json") as address:
        owner = client(address)
        assert owner.latest() is None
        owner.record(None, Entry(2, D1))
        owner.record(Entry(2, D1), Entry(4, D2))
        assert owner.latest() == Entry(4, D2) == Ledger(tmp_path / "ledger.json").latest("run-1")
        with pytest.raises(AttestationError, match="holds step 4 for run run-1, not this checkpoint of step 6"):
            owner.record(Entry(2, D1), Entry(6, D3))  # a second process on an old branch of the run
        with pytest.raises(AttestationError, match="tag does not verify"):
            client(address, key=new_data_key()).record(Entry(4, D2), Entry(9, D3))  # no data key, no say
        with pytest.raises(AttestationError, match="does not verify"):
            client(address, key=new_data_key()).latest()
        assert owner.latest() == Entry(4, D2) and client(address, "run-2").latest() is None
    with serving(Policy(frozenset({("dev", "ab")}), frozenset({"00" * 32}))) as (address, _, _):
        with pytest.raises(AttestationError, match="keeps no checkpoint ledger"):
            client(address).latest()


def test_a_replayed_report_does_not_move_the_ledger_back(tmp_path):
    captured: list[dict] = []
    with attacker(captured.append) as address, pytest.raises(AttestationError):
        client(address).record(None, Entry(2, D1))  # the attacker keeps the report (and answers nothing)
    with ledger_server(tmp_path / "ledger.json") as address:
        client(address).record(None, Entry(2, D1))
        client(address).record(Entry(2, D1), Entry(4, D2))
        answer = exchange(address, captured[0])  # played to the real server once the run moved on
        assert (answer["type"], answer["step"], answer["digest"]) == ("recorded", 4, D2)
        assert client(address).latest() == Entry(4, D2)


def test_a_forged_recorded_answer_is_refused():
    """The attacker answers for the key server: the plain acknowledgement the enclave used to believe, or one
    tagged under a key that is not the data key's."""
    wrong = ledger_key(new_data_key())
    for forge in (lambda m: {"type": "recorded", "step": m["step"], "digest": m["digest"]},
                  lambda m: {"type": "recorded", "step": m["step"], "digest": m["digest"],
                             "tag": _tag(wrong, "recorded", m["run_id"], m["nonce"], m["step"], m["digest"])}):
        with attacker(forge) as address, pytest.raises(AttestationError, match="does not verify"):
            client(address).record(None, Entry(2, D1))


def test_an_authentic_answer_for_another_step_is_refused():
    """Even a correctly tagged answer must name the very checkpoint reported: the ledger holds that one now."""
    key = ledger_key(DATA_KEY)

    def older(m: dict) -> dict:
        return {"type": "recorded", "step": 1, "digest": D3,
                "tag": _tag(key, "recorded", m["run_id"], m["nonce"], 1, D3)}

    with attacker(older) as address, pytest.raises(AttestationError,
                                                   match=r"holds step 1 .* not this checkpoint of step 2"):
        client(address).record(None, Entry(2, D1))


def test_an_answer_replayed_from_an_earlier_request_is_refused(tmp_path):
    """A man in the middle keeps the key server's genuine answer and plays it back to a later, identical report
    that never reached the server: the answer is bound to the nonce of the request it answered."""
    with ledger_server(tmp_path / "ledger.json") as real:
        answers: dict[str, dict] = {}

        def relay_once_then_replay(m: dict) -> dict:
            if m["type"] not in answers:
                answers[m["type"]] = exchange(real, m)
            return answers[m["type"]]

        with attacker(relay_once_then_replay) as address:
            client(address).record(None, Entry(2, D1))
            with pytest.raises(AttestationError, match="does not verify: forged, altered, or replayed"):
                client(address).record(None, Entry(2, D1))
            assert client(address).latest() == Entry(2, D1)
            client(real).record(Entry(2, D1), Entry(4, D2))
            with pytest.raises(AttestationError, match="does not verify"):
                client(address).latest()  # the old "step 2" would let a rollback to it through


def _checkpoints(folder: Path, address: str, run_id: str) -> SealedCheckpoints:
    return SealedCheckpoints(folder, DATA_KEY, run_id, client(address, run_id))


def _started(folder: Path, address: str, run_id: str) -> SealedCheckpoints:
    store = _checkpoints(folder, address, run_id)
    store.begin()
    return store


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((3,), float(step))}


def test_a_blocked_report_stops_the_run_and_loses_nothing(tmp_path):
    run_id, folder = new_run_id(), tmp_path / "checkpoints"
    with ledger_server(tmp_path / "ledger.json") as real:
        def block_reports(m: dict) -> dict | None:
            return None if m["type"] == "checkpoint" else exchange(real, m)

        with attacker(block_reports) as address:
            store = _started(folder, address, run_id)
            with pytest.raises(AttestationError, match=r"step 2 is written \(.*step-00000002.sealed\) but the key "
                                                       "server did not record it .* The run stops here"):
                store.save(_state(2), 2)
        assert store.steps() == [2]  # the checkpoint stays
        resumed = _checkpoints(folder, real, run_id)  # the key server answers again: resume records it first
        assert resumed.resume()["step"] == 2
        assert Ledger(tmp_path / "ledger.json").latest(run_id).step == 2
        resumed.save(_state(4), 4)
        assert Ledger(tmp_path / "ledger.json").latest(run_id).step == 4


def test_a_rollback_by_deleting_the_newer_checkpoints_is_refused_on_resume(tmp_path):
    run_id, folder = new_run_id(), tmp_path / "checkpoints"
    with ledger_server(tmp_path / "ledger.json") as address:
        store = _started(folder, address, run_id)
        for step in (2, 4, 6):
            store.save(_state(step), step)
        store.path(6).unlink()
        store.path(4).unlink()
        with pytest.raises(CheckpointError, match="recorded a checkpoint of step 6, but the newest here is step 2"):
            _checkpoints(folder, address, run_id).resume()
        with pytest.raises(CheckpointError, match="up to step 6: this bundle was trained before"):
            _checkpoints(tmp_path / "again", address, run_id).begin()  # nor can the run start over from scratch
        with pytest.raises(AttestationError, match=f"back from step 6 to step 2: .* --allow-rewind {run_id}:2"):
            _checkpoints(folder, address, run_id).resume(2)  # --resume-step is the host's word, not the owner's
    with ledger_server(tmp_path / "ledger.json", rewinds=((run_id, 2),)) as address:
        store = _checkpoints(folder, address, run_id)
        assert store.resume(2)["step"] == 2  # the owner's consent: the ledger follows
        assert Ledger(tmp_path / "ledger.json").latest(run_id).step == 2
        store.save(_state(4), 4)
        with pytest.raises(AttestationError, match="would go back from step 4 to step 2"):
            _checkpoints(folder, address, run_id).resume(2)  # the consent was for one rollback


def test_a_checkpoint_swapped_for_another_of_the_same_step_is_refused(tmp_path):
    run_id, folder = new_run_id(), tmp_path / "checkpoints"
    with ledger_server(tmp_path / "ledger.json") as address:
        store = _started(folder, address, run_id)
        store.save(_state(2), 2)
        recorded = store.path(2).read_bytes()
        SealedCheckpoints(tmp_path / "other", DATA_KEY, run_id).save(_state(2), 2)  # same run, step, other bytes
        store.path(2).write_bytes((tmp_path / "other" / "step-00000002.sealed").read_bytes())
        with pytest.raises(CheckpointError, match="step 2 is not the one the key server recorded"):
            _checkpoints(folder, address, run_id).resume()
        store.path(2).write_bytes(recorded)
        assert _checkpoints(folder, address, run_id).resume()["step"] == 2


def test_the_keyserver_command_takes_the_owners_consent_to_a_rollback_as_run_and_step(tmp_path):
    write_key_file(tmp_path / "data.key", DATA_KEY)
    assert_one_line_error(invoke("keyserver", "--key", str(tmp_path / "data.key"), "--expect", "dev:ab",
                                 "--dev-trust", "00" * 32, "--allow-rewind", "run-1"), 2,
                          "--allow-rewind is RUN_ID:STEP", "'run-1'")
