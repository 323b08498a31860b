"""Workers that join over torch.distributed (loopback here): the token, the refusals, the same training."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import protect_quietly
from tempo.enclave.distributed import DistributedPool
from tempo.enclave.pools import InProcessPool
from tempo.errors import ConfigError, WorkerLostError

TOKEN = b"a-secret-token-of-at-least-16-bytes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(address: str, token_file: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tempo.cli", "worker", "--connect", address, "--token-file",
                             str(token_file), "--name", name, "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pool(n: int, address: str, log: list[str]) -> tuple[threading.Thread, dict]:
    """Start a DistributedPool in a thread (it blocks until n workers joined)."""
    made: dict = {}

    def listen() -> None:
        try:
            made["pool"] = DistributedPool(n, listen=address, token=TOKEN, timeout=60, join_timeout=60,
                                           log=log.append)
        except Exception as e:  # handed to the test thread
            made["error"] = e

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    return thread, made


def _steps(pool, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    net = protect_quietly(model, pool, scheme="mix")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_workers_join_with_the_token_and_train_as_in_process_workers_do(tmp_path):
    (tmp_path / "token").write_bytes(TOKEN)
    (tmp_path / "wrong").write_bytes(b"not-the-token-but-long-enough-for-one")
    address, log = f"127.0.0.1:{_free_port()}", []
    thread, made = _pool(2, address, log)
    intruder = _worker(address, tmp_path / "wrong", "intruder")
    _, err = intruder.communicate(timeout=60)
    assert intruder.returncode == 2 and "refused this worker: wrong token" in err
    workers = [_worker(address, tmp_path / "token", f"gpu-{i}") for i in range(2)]
    thread.join(timeout=60)
    assert "error" not in made, made.get("error")
    pool = made["pool"]
    try:
        assert pool.size == 2 and any("refused the worker in slot 1: wrong token" in line for line in log)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            remote, local = _steps(pool), _steps(InProcessPool(2))
        torch.testing.assert_close(torch.tensor(remote), torch.tensor(local), rtol=1e-5, atol=1e-6)
        assert pool.stats.bytes_sent > 0 and pool.stats.messages_received == pool.stats.messages_sent
    finally:
        pool.close()
    for w in workers:
        assert w.wait(timeout=30) == 0, w.stderr.read()


def test_a_killed_remote_worker_hands_its_work_to_the_other(tmp_path):
    (tmp_path / "token").write_bytes(TOKEN)
    address, log = f"127.0.0.1:{_free_port()}", []
    thread, made = _pool(2, address, log)
    workers = [_worker(address, tmp_path / "token", f"gpu-{i}") for i in range(2)]
    thread.join(timeout=60)
    pool = made["pool"]
    try:
        workers[1].kill()
        workers[1].wait()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
            net = protect_quietly(model, pool, scheme="mix")
            net(torch.randn(8, 12)).sum().backward()
            net(torch.randn(8, 12)).sum().backward()
        assert [f["kind"] for f in net.engine.faults] == ["lost"] and "gpu-1" in net.engine.faults[0]["worker"]
    finally:
        pool.close()
    assert workers[0].wait(timeout=30) == 0


def test_a_killed_worker_is_a_clear_error_naming_it(tmp_path):
    (tmp_path / "token").write_bytes(TOKEN)
    address, log = f"127.0.0.1:{_free_port()}", []
    thread, made = _pool(1, address, log)
    worker = _worker(address, tmp_path / "token", "doomed")
    thread.join(timeout=60)
    pool = made["pool"]
    worker.kill()
    worker.wait()
    with pytest.raises(WorkerLostError, match="link to worker 'doomed'"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _steps(pool)


def test_bad_settings_are_named(tmp_path):
    (tmp_path / "short").write_bytes(b"short")
    from tempo.wire.dist import read_token

    with pytest.raises(ConfigError, match="at least 32"):
        read_token(tmp_path / "short")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        DistributedPool(1, listen="nowhere", token=TOKEN)


def test_tempo_train_listens_for_remote_workers(tmp_path):
    """The two-host walkthrough on one host: `tempo train --listen` and `tempo worker --connect`."""
    (tmp_path / "token").write_bytes(TOKEN)
    address = f"127.0.0.1:{_free_port()}"
    train = subprocess.Popen([sys.executable, "-m", "tempo.cli", "train", "--listen", address, "--workers", "1",
                              "--token-file", str(tmp_path / "token"), "--model", "small_cnn", "--train-subset", "128",
                              "--test-subset", "100", "--batch-size", "64", "--epochs", "1", "--no-progress",
                              "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    worker = _worker(address, tmp_path / "token", "gpu-host")
    out, err = train.communicate(timeout=300)
    assert train.returncode == 0, err
    assert "remote (joining on" in out and "worker 'gpu-host' (slot 1) joined (1/1)" in out + err
    assert worker.wait(timeout=30) == 0
    steps = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    assert len(steps) == 2 and '"bytes_sent": 0' not in steps[1]  # step 1 runs inside (learns the anchors)


ROGUE = """
import sys, torch
from tempo.wire.dist import connect, read_token
from pathlib import Path
transport = connect(sys.argv[1], read_token(Path(sys.argv[2])), "rogue", timeout=60)
transport.recv()  # its first job
reply = {"huge": [1 << 40], "garbage": [64]}[sys.argv[3]]
transport.group.send([torch.tensor(reply[:1], dtype=torch.int64)], 0, 0).wait()
if sys.argv[3] == "garbage":
    transport.group.send([torch.randint(0, 255, (64,), dtype=torch.uint8)], 0, 1).wait()
transport.recv()  # stay until the enclave hangs up
"""


@pytest.mark.parametrize("reply", ["huge", "garbage"])
def test_a_worker_that_sends_malformed_frames_is_retired_and_its_work_redone(tmp_path, reply):
    """A worker with the token that answers a job with an oversized length or bytes that are no frame:
    the enclave rejects the reply, counts a 'malformed' fault against it, and the other worker takes over."""
    (tmp_path / "token").write_bytes(TOKEN)
    address, log = f"127.0.0.1:{_free_port()}", []
    thread, made = _pool(2, address, log)
    rogue = subprocess.Popen([sys.executable, "-c", ROGUE, address, str(tmp_path / "token"), reply],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    honest = _worker(address, tmp_path / "token", "honest")
    thread.join(timeout=60)
    pool = made["pool"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            net = protect_quietly(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)), pool, scheme="mix")
            for _ in range(2):
                net(torch.randn(8, 12)).sum().backward()
        (fault,) = net.engine.faults
        assert fault["kind"] == "malformed" and "rogue" in fault["worker"]
    finally:
        pool.close()
        rogue.kill()
    assert honest.wait(timeout=30) == 0


def test_a_worker_with_an_idle_timeout_stops_when_the_enclave_falls_silent(tmp_path):
    (tmp_path / "token").write_bytes(TOKEN)
    address, log = f"127.0.0.1:{_free_port()}", []
    thread, made = _pool(1, address, log)
    worker = subprocess.Popen([sys.executable, "-m", "tempo.cli", "worker", "--connect", address, "--token-file",
                               str(tmp_path / "token"), "--name", "idle", "--idle-timeout", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thread.join(timeout=60)
    try:
        _, err = worker.communicate(timeout=60)  # the enclave holds the link open and sends nothing
    finally:
        made["pool"].close()
    assert worker.returncode == 0 and "[idle] stopping: enclave at" in err and "sent nothing for 2.0 s" in err
