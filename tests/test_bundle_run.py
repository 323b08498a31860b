"""seal -> keyserver -> train --bundle -> unseal, end to end, and the same model as training in the clear."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

from tempo.attestation import dev
from tempo.attestation.framing import send
from tempo.attestation.ledger import Ledger
from tempo.attestation.policy import Policy
from tempo.attestation.release import KeyServer
from tempo.sealed.bundle import OpenBundle
from tempo.sealed.metrics import open_metrics
from tempo.sealed.model import open_state
from tempo.sealed.stream import read_key_file
from tempo.training.config import DEFAULT_FASHION_MNIST_DIR, TrainConfig
from tempo.training.loop import train
from test_attestation_ledger import intercepting
from test_cli import assert_one_line_error, invoke

RUN = {"model": "small_cnn", "epochs": 1, "train_subset": 256, "test_subset": 200, "batch_size": 64,
       "scheme": "mix", "seed": 3}
HOST = ["--in-process-workers", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def sealed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(bundle, data key file, dev signing key) for Fashion-MNIST and RUN."""
    d = tmp_path_factory.mktemp("owner")
    (d / "run.json").write_text(json.dumps(RUN))
    r = invoke("seal", "--data", str(DEFAULT_FASHION_MNIST_DIR), "--model", str(d / "run.json"),
               "--out", str(d / "fmnist.sealed"))
    assert r.returncode == 0, r.stderr
    dev.create_signing_key(d / "dev.pem")
    return d / "fmnist.sealed", d / "fmnist.sealed.key", d / "dev.pem"


@pytest.fixture
def keyserver(sealed, tmp_path) -> Iterator[tuple[str, list[str]]]:
    def start(measurement: str, *, allow_rewind: int | None = None) -> str:
        """A key server (on the test's one ledger file), consenting to a rollback of the bundle's run to
        `allow_rewind` if given."""
        rewinds = [] if allow_rewind is None else [(OpenBundle(sealed[0], read_key_file(sealed[1])).run_id,
                                                    allow_rewind)]
        public = dev.public_key_hex(dev.load_signing_key(sealed[2]))
        ks = KeyServer(read_key_file(sealed[1]), Policy(frozenset({("dev", measurement)}), frozenset({public})),
                       ledger=Ledger(tmp_path / "ledger.json", rewinds=rewinds), log=log.append, timeout=10)
        host, port = ks.bind("127.0.0.1", 0)
        thread = threading.Thread(target=ks.serve_forever, args=(stop,), daemon=True)
        thread.start()
        servers.append((ks, thread))
        return f"{host}:{port}"

    log: list[str] = []
    stop, servers = threading.Event(), []
    yield start, log
    stop.set()
    for ks, thread in servers:
        thread.join()
        ks.close()


def dropping_checkpoint_reports(address: str) -> AbstractContextManager[str]:
    """A network attacker between the enclave and the key server: it relays the key release and the ledger's
    queries, and drops every checkpoint report unanswered."""

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def relay(conn: socket.socket, first: dict) -> None:
        if first["type"] == "checkpoint":
            return
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as upstream:
            send(upstream, first)
            back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
            back.start()
            pump(conn, upstream)
            back.join()

    return intercepting(relay)


def _train_bundle(sealed, address: str, out: Path, *extra: str):
    bundle, _, dev_key = sealed
    return invoke("train", "--bundle", str(bundle), "--keyserver", address, "--attestation", "dev",
                  "--dev-key", str(dev_key), "--out", str(out), *HOST, *extra)


def test_training_from_a_bundle_gives_the_plaintext_runs_model_sealed(sealed, keyserver, tmp_path):
    start, _ = keyserver
    shm_before = set(Path("/dev/shm").glob("tempo-bundle-*"))
    r = _train_bundle(sealed, start(dev.measure()), tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "proves NOTHING about hardware" in r.stderr and "data key released" in r.stderr
    assert (tmp_path / "run" / "model.sealed").is_file() and not (tmp_path / "run" / "model.pt").exists()
    assert set(Path("/dev/shm").glob("tempo-bundle-*")) == shm_before  # the plaintext data is gone

    r = invoke("unseal", str(tmp_path / "run" / "model.sealed"), "--key", str(sealed[1]), "--out",
               str(tmp_path / "owner"))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "owner" / "manifest.json").read_text())
    assert manifest["step"] == 256 // 64 and len(manifest["run_id"]) == 32
    got = torch.load(tmp_path / "owner" / "model.pt", weights_only=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clear = train(TrainConfig(**RUN, in_process_workers=True, workers=1, progress=False, out=tmp_path / "clear"),
                      log=lambda _: None)
    want = torch.load(clear.out_dir / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    for name in want:  # fresh keys per run: the same model up to blinding's float rounding
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_key_server_expecting_other_code_stops_the_run_before_any_data_is_read(sealed, keyserver, tmp_path):
    start, log = keyserver
    r = _train_bundle(sealed, start("ab" * 32), tmp_path / "run")
    assert_one_line_error(r, 4, "refused to release the key", "is not the expected one")
    assert not (tmp_path / "run").exists()
    assert any("is not the expected one" in line for line in log)


def test_bundle_options_are_checked(sealed, tmp_path):
    bundle = sealed[0]
    assert_one_line_error(invoke("train", "--bundle", str(bundle), "--epochs", "3", "--keyserver", "x:1"), 2,
                          "settings come from the bundle", "epochs")
    assert_one_line_error(invoke("train", "--bundle", str(bundle)), 2, "needs --keyserver")
    assert_one_line_error(invoke("train", "--bundle", str(bundle), "--keyserver", "127.0.0.1:1"), 2,
                          "needs --attestation")
    assert_one_line_error(invoke("train", "--keyserver", "127.0.0.1:1"), 2, "go with --bundle")


def test_sealed_checkpoints_resume_and_refuse_tampering_or_replay(sealed, keyserver, tmp_path):
    start, _ = keyserver
    address, run = start(dev.measure()), tmp_path / "run"
    r = _train_bundle(sealed, address, run, "--checkpoint-every", "2")
    assert r.returncode == 0, r.stderr
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002.sealed", "step-00000004.sealed"]
    assert b"weight" not in (folder / "step-00000004.sealed").read_bytes()  # sealed, not a torch zip
    first = (run / "model.sealed").read_bytes()

    newest = folder / "step-00000004.sealed"
    good = newest.read_bytes()
    newest.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert_one_line_error(_train_bundle(sealed, address, run, "--checkpoint-every", "2", "--resume"), 2,
                          "step 4 is not valid", "fails authentication", "--resume-step with one of [2]")
    newest.write_bytes((folder / "step-00000002.sealed").read_bytes())
    assert_one_line_error(_train_bundle(sealed, address, run, "--checkpoint-every", "2", "--resume"), 2,
                          "sealed at step 2, not 4", "replayed")

    with_consent = start(dev.measure(), allow_rewind=2)  # the owner allows going back to step 2
    r = _train_bundle(sealed, with_consent, run, "--checkpoint-every", "2", "--resume", "--resume-step", "2")
    assert r.returncode == 0, r.stderr
    assert "resumed from the checkpoint of step 2" in r.stdout
    key = read_key_file(sealed[1])
    (_, resumed), (_, whole) = (open_state(run / "model.sealed", key), open_state_bytes(first, key, tmp_path))
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)


def open_state_bytes(data: bytes, key: bytes, tmp_path: Path):
    (tmp_path / "copy.sealed").write_bytes(data)
    return open_state(tmp_path / "copy.sealed", key)


def test_deleting_the_newest_checkpoints_is_caught_by_the_key_servers_ledger(sealed, keyserver, tmp_path):
    start, log = keyserver
    address, run = start(dev.measure()), tmp_path / "run"
    r = _train_bundle(sealed, address, run, "--checkpoint-every", "2")
    assert r.returncode == 0, r.stderr
    assert sum("recorded checkpoint step" in line for line in log) == 2
    (run / "checkpoints" / "step-00000004.sealed").unlink()  # the cloud hides the newest
    assert_one_line_error(_train_bundle(sealed, address, run, "--checkpoint-every", "2", "--resume"), 2,
                          "recorded a checkpoint of step 4, but the newest here is step 2", "rollback")
    assert_one_line_error(_train_bundle(sealed, address, tmp_path / "again", "--checkpoint-every", "2"), 2,
                          "up to step 4: this bundle was trained before")  # nor can the run start over unnoticed
    assert_one_line_error(_train_bundle(sealed, address, run, "--checkpoint-every", "2", "--resume", "--resume-step",
                                        "2"), 4, "would go back from step 4 to step 2", "owner's consent",
                          "--allow-rewind")  # the host's operator types --resume-step: not enough
    with_consent = start(dev.measure(), allow_rewind=2)
    r = _train_bundle(sealed, with_consent, run, "--checkpoint-every", "2", "--resume", "--resume-step", "2")
    assert r.returncode == 0, r.stderr
    assert "resumed from the checkpoint of step 2" in r.stdout


def test_a_bundle_run_writes_nothing_in_the_clear_and_the_owner_gets_the_metrics_back(sealed, keyserver, tmp_path):
    start, _ = keyserver
    bundle, key_file, dev_key = sealed
    run = tmp_path / "run"
    r = invoke("train", "--bundle", str(bundle), "--keyserver", start(dev.measure()), "--attestation", "dev",
               "--dev-key", str(dev_key), "--out", str(run), "--in-process-workers", "--workers", "1",
               "--checkpoint-every", "2")  # with the progress bar: the host sees it too
    assert r.returncode == 0, r.stderr
    assert {p.name for p in run.iterdir()} == {"checkpoints", "metrics.sealed", "model.sealed"}

    r_owner = invoke("unseal", str(run / "metrics.sealed"), "--key", str(key_file), "--out", str(tmp_path / "owner"))
    assert r_owner.returncode == 0, r_owner.stderr
    owner = tmp_path / "owner"
    config = json.loads((owner / "config.json").read_text())
    assert {k: config[k] for k in RUN} == RUN
    steps = [json.loads(line) for line in (owner / "steps.jsonl").read_text().splitlines()]
    epochs = [json.loads(line) for line in (owner / "epochs.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and len(epochs) == 1
    assert (owner / "steps.csv").read_text().startswith("step,epoch,loss,accuracy")
    assert (owner / "faults.jsonl").read_text() == ""
    assert open_metrics(run / "metrics.sealed", read_key_file(key_file))["tables"]["steps"][1] == steps

    values = [v for row in steps + epochs for k, v in row.items() if "loss" in k or "accuracy" in k]
    secrets = {b"small_cnn", b"train_subset", b"test_subset", b"scheme", b"loss", b"accuracy"}
    secrets |= {text.encode() for v in values for text in (repr(v), f"{v:.4f}", f"{v:.2%}") if len(text) >= 6}
    for path in (p for p in run.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert not [s for s in secrets if s in data], f"{path} holds plaintext"
    terminal = r.stdout + r.stderr
    assert "img/s" in r.stderr and "shows progress only" in r.stdout
    assert "loss" not in terminal and "acc" not in terminal and "small_cnn" not in terminal
    assert not [s for s in secrets if s.decode() in terminal]


def test_a_checkpoint_the_key_server_cannot_record_stops_the_run_and_resume_picks_it_up(sealed, keyserver, tmp_path):
    """A network attacker blocks the checkpoint reports (to delete the checkpoints later unnoticed): the run stops
    at the first one, keeps it, and --resume records it once the key server is reachable again."""
    start, log = keyserver
    address, run = start(dev.measure()), tmp_path / "run"
    with dropping_checkpoint_reports(address) as attacker:
        assert_one_line_error(_train_bundle(sealed, attacker, run, "--checkpoint-every", "2"), 4,
                              "step 2 is written", "did not record it", "The run stops here", "--resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002.sealed"]
    assert not (run / "model.sealed").exists()
    key = read_key_file(sealed[1])
    assert [s["step"] for s in open_metrics(run / "metrics.sealed", key)["tables"]["steps"][1]] == [1, 2]

    r = _train_bundle(sealed, address, run, "--checkpoint-every", "2", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from the checkpoint of step 2" in r.stdout and (run / "model.sealed").is_file()
    assert sum("recorded checkpoint step" in line for line in log) == 2  # step 2 on resuming, then step 4
