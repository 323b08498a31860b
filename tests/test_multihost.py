"""Enclave and workers on different (namespaced) hosts: same losses as in-process workers, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tempo.testing.netns import hosts
from tempo.training.config import TrainConfig
from tempo.training.loop import train

TOKEN = b"multi-host-token-0123456789abcdef"
RUN = ["--model", "small_cnn", "--train-subset", "192", "--test-subset", "100", "--batch-size", "64", "--epochs", "1",
       "--seed", "5", "--no-progress"]
PORT = 29555


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("local") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(model="small_cnn", train_subset=192, test_subset=100, batch_size=64, epochs=1, seed=5,
                          in_process_workers=True, workers=1, progress=False, out=out), log=lambda _: None)
    return _losses(out)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_on_other_hosts_train_as_local_ones_do(workers, local_losses, tmp_path):
    (tmp_path / "token").write_bytes(TOKEN)
    with hosts(workers + 1) as network:
        enclave, *gpus = network.hosts
        address = f"{enclave.address}:{PORT}"
        trainer = subprocess.Popen(enclave.command(sys.executable, "-m", "tempo.cli", "train", "--listen", address,
                                                   "--workers", str(workers), "--token-file", str(tmp_path / "token"),
                                                   "--out", str(tmp_path / "run"), *RUN),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        joined = [subprocess.Popen(gpu.command(sys.executable, "-m", "tempo.cli", "worker", "--connect", address,
                                               "--token-file", str(tmp_path / "token"), "--name", gpu.namespace,
                                               "--timeout", "120"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for gpu in gpus]
        out, err = trainer.communicate(timeout=300)
        assert trainer.returncode == 0, err
        for worker in joined:
            assert worker.wait(timeout=60) == 0, worker.stderr.read()
    assert f"joined ({workers}/{workers})" in out + err
    assert _losses(tmp_path / "run") == pytest.approx(local_losses, rel=1e-4)


def test_a_worker_cut_off_the_network_mid_run_is_replaced(tmp_path):
    """Two workers on other hosts; after 3 steps one host's link goes down. The enclave waits
    --worker-timeout for it, retires it, redoes its shard on the other worker, and the run ends with
    the losses of an in-process run."""
    (tmp_path / "token").write_bytes(TOKEN)
    run = ["--model", "small_cnn", "--train-subset", "640", "--test-subset", "100", "--batch-size", "64",
           "--epochs", "1", "--seed", "5", "--no-progress"]
    local = tmp_path / "local"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(model="small_cnn", train_subset=640, test_subset=100, batch_size=64, epochs=1, seed=5,
                          in_process_workers=True, workers=1, progress=False, out=local), log=lambda _: None)
    with hosts(3) as network:
        enclave, gpu, doomed = network.hosts
        address = f"{enclave.address}:{PORT + 2}"
        trainer = subprocess.Popen(enclave.command(sys.executable, "-m", "tempo.cli", "train", "--listen", address,
                                                   "--workers", "2", "--token-file", str(tmp_path / "token"),
                                                   "--worker-timeout", "5", "--out", str(tmp_path / "run"), *run),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        workers = [subprocess.Popen(host.command(sys.executable, "-m", "tempo.cli", "worker", "--connect", address,
                                                 "--token-file", str(tmp_path / "token"), "--name", host.namespace,
                                                 "--timeout", "120"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for host in (gpu, doomed)]
        try:
            steps = tmp_path / "run" / "steps.jsonl"
            deadline = time.monotonic() + 180
            while not (steps.exists() and steps.read_text().count("\n") >= 3):
                assert time.monotonic() < deadline and trainer.poll() is None, trainer.stderr.read()
                time.sleep(0.05)
            subprocess.run(doomed.command("ip", "link", "set", doomed.interface, "down"), check=True)
            _, err = trainer.communicate(timeout=300)
            assert trainer.returncode == 0, err
            assert workers[0].wait(timeout=60) == 0
        finally:
            for worker in workers:
                worker.kill()  # the cut-off worker waits for an enclave it can no longer hear
                worker.wait()
    (fault,) = [json.loads(line) for line in (tmp_path / "run" / "faults.jsonl").read_text().splitlines()]
    assert doomed.namespace in fault["worker"] and fault["kind"] in ("stalled", "lost"), fault
    assert _losses(tmp_path / "run") == pytest.approx(_losses(local), rel=1e-4)


def test_a_worker_with_the_wrong_token_is_refused_across_hosts(tmp_path):
    (tmp_path / "token").write_bytes(TOKEN)
    (tmp_path / "wrong").write_bytes(b"some-other-token-0123456789abcdef")
    with hosts(3) as network:
        enclave, stranger, gpu = network.hosts
        address = f"{enclave.address}:{PORT + 1}"
        trainer = subprocess.Popen(enclave.command(sys.executable, "-m", "tempo.cli", "train", "--listen", address,
                                                   "--workers", "1", "--token-file", str(tmp_path / "token"),
                                                   "--out", str(tmp_path / "run"), *RUN),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        refused = subprocess.run(stranger.command(sys.executable, "-m", "tempo.cli", "worker", "--connect", address,
                                                  "--token-file", str(tmp_path / "wrong"), "--timeout", "120"),
                                 capture_output=True, text=True, timeout=180)
        assert refused.returncode == 2 and "refused this worker: wrong token" in refused.stderr
        worker = subprocess.Popen(gpu.command(sys.executable, "-m", "tempo.cli", "worker", "--connect", address,
                                              "--token-file", str(tmp_path / "token"), "--timeout", "120"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = trainer.communicate(timeout=300)
        assert trainer.returncode == 0, err
        assert worker.wait(timeout=60) == 0
    assert "refused the worker in slot 1: wrong token" in out + err


def test_a_rate_cap_puts_a_token_bucket_on_both_ends_of_each_link():
    with hosts(1, rate="100mbit") as network:
        (host,) = network.hosts
        inside = subprocess.run(host.command("tc", "qdisc", "show"), capture_output=True, text=True).stdout
        outside = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    assert "tbf" in inside and "rate 100Mbit" in inside
    assert any("tbf" in line and "rate 100Mbit" in line and f"tv{host.namespace.split('-')[1]}h0" in line
               for line in outside.splitlines())
