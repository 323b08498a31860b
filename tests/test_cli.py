"""The command line: one-line errors with exit codes, worker loss, and whole training runs."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tempo.cli import app
from tempo.cli.errors import exit_code
from tempo.errors import (
    ConfigError,
    DatasetError,
    IntegrityError,
    ProtocolError,
    TempoError,
    UnsupportedModelError,
    WorkerLostError,
    WorkerTimeoutError,
)
from tempo.training.config import DatasetName, Mode, TrainConfig
from tempo.training.loop import train
from tempo.training.models import build_model
from test_data import write_fashion_mnist

TINY = ["--dataset", "synthetic", "--model", "timm:test_resnet", "--synthetic-shape", "3,16,16",
        "--synthetic-classes", "4", "--train-subset", "32", "--test-subset", "16", "--batch-size", "16",
        "--epochs", "1", "--no-progress"]


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One torch thread here and in worker processes: tiny models gain nothing from two, and on a
    busy 2-core machine two spinning OpenMP threads per process slow each op down by a time slice."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tempo_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`tempo ...` as a user runs it: a separate process, so tracebacks and exit codes are real."""
    return subprocess.run([sys.executable, "-m", "tempo.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def invoke(*args: str) -> subprocess.CompletedProcess:
    """`tempo ...` in this process (fast: torch is already loaded); returns what tempo_cli would."""
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


def test_importing_the_cli_loads_no_torch() -> None:
    code = "import sys, tempo.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_env_prints_versions_and_devices() -> None:
    result = invoke("env")
    assert result.returncode == 0
    for name in ("python:", "torch: " + torch.__version__.split("+")[0], "torchvision:", "timm:", "numpy:",
                 "tempo: 0.1.0", "CUDA available:", "CPUs:"):
        assert name in result.stdout


def test_missing_dataset_folder(tmp_path: Path) -> None:
    result = tempo_cli("train", "--data-dir", str(tmp_path / "nowhere"), "--no-progress")
    assert_one_line_error(result, 2, str(tmp_path / "nowhere"), "apt-get install dataset-fashion-mnist",
                          "--data-dir")


def test_corrupt_dataset_file(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-50])
    result = invoke("train", "--data-dir", str(tmp_path), "--no-progress")
    assert_one_line_error(result, 2, str(images), "corrupt or truncated", "apt-get install --reinstall", "--data-dir")


def test_unknown_model(tmp_path: Path) -> None:
    result = invoke("train", *TINY, "--model", "resnet1800", "--out", str(tmp_path / "run"))
    assert_one_line_error(result, 2, "unknown model 'resnet1800'", "Did you mean")
    assert not (tmp_path / "run").exists()  # nothing written, no worker started


@pytest.mark.parametrize(("args", "fragment"), [
    (["--scheme", "rot13"], "unknown scheme 'rot13'"),
    (["--synthetic-shape", "3,16"], "--synthetic-shape must be C,H,W"),
    (["--batch-size", "64"], "batch size 64 exceeds the 32 training images"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--mode", "plain", "--key-lifetime", "3"], "--key-lifetime needs --mode tempo"),
    (["--train-subset", "0", "--dataset", "cifar10"], "CIFAR-10 has no default location"),
])
def test_bad_settings(args: list[str], fragment: str) -> None:
    result = invoke("train", *TINY, *args)
    assert_one_line_error(result, 2, fragment)
    assert result.stderr.strip().startswith("error: ")


def test_config_accepts_strings_and_names_every_problem() -> None:
    config = TrainConfig(mode="plain", dataset="synthetic", out="runs/x")
    assert (config.mode, config.dataset, config.out) == (Mode.PLAIN, DatasetName.SYNTHETIC, Path("runs/x"))
    with pytest.raises(ConfigError, match=r"unknown mode 'gpu'; choose one of \['tempo', 'plain', 'enclave'\]"):
        TrainConfig(mode="gpu")
    with pytest.raises(ConfigError, match=r"epochs must be >= 1, got 0; .*train_subset must be >= 1"):
        TrainConfig(epochs=0, train_subset=0)


def test_exit_codes_by_error_kind() -> None:
    lie = IntegrityError(op="fc", product="forward", step=1, worker="w", detail="off")
    bad_input = [ConfigError("x"), DatasetError("x"), UnsupportedModelError(["a (Conv1d)"])]
    workers = [WorkerLostError("x"), WorkerTimeoutError("x"), ProtocolError("x"), lie]
    assert [exit_code(e) for e in bad_input] == [2, 2, 2]
    assert [exit_code(e) for e in workers] == [3, 3, 3, 3]
    assert exit_code(TempoError("x")) == 1


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:  # the thread or process ended meanwhile
        return b""


def _worker_children(pid: int) -> list[int]:
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in _read(task / "children").split()]
    return [c for c in children if b"tempo.worker" in _read(Path(f"/proc/{c}/cmdline"))]


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def _start_training(out: Path) -> tuple[subprocess.Popen, list[int]]:
    """`tempo train` with process workers, returned once it has taken two steps, with its worker pids."""
    args = [*TINY, "--train-subset", "4096", "--epochs", "20", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "tempo.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    steps = out / "steps.jsonl"
    while not (steps.exists() and steps.read_text().count("\n") >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training did not get under way: {proc.communicate()[1]}")
        time.sleep(0.05)
    workers = _worker_children(proc.pid)
    assert len(workers) == 2
    return proc, workers


def _finish(proc: subprocess.Popen, within: float) -> subprocess.CompletedProcess:
    start = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=within)
    finally:
        proc.kill()
    assert time.monotonic() - start < within
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


@needs_proc
@pytest.mark.usefixtures("one_thread")
def test_workers_killed_mid_training(tmp_path: Path) -> None:
    """The first killed worker's work moves to the other (a fault in faults.jsonl); killing the last one
    stops the run with an error naming it, and no worker is left running."""
    proc, workers = _start_training(tmp_path)
    os.kill(workers[1], signal.SIGKILL)
    faults, deadline = tmp_path / "faults.jsonl", time.monotonic() + 30
    while not (faults.exists() and faults.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not carry on past the fault"
        time.sleep(0.05)
    rows = [json.loads(line) for line in faults.read_text().splitlines()]
    assert len(rows) == 1, rows
    (fault,) = rows
    assert fault["kind"] == "lost" and f"pid {workers[1]}" in fault["worker"]
    os.kill(workers[0], signal.SIGKILL)
    result = _finish(proc, within=15)
    assert_one_line_error(result, 3, "worker-0", f"pid {workers[0]}")


@needs_proc
@pytest.mark.usefixtures("one_thread")
def test_ctrl_c_mid_training(tmp_path: Path) -> None:
    proc, workers = _start_training(tmp_path)
    proc.send_signal(signal.SIGINT)
    result = _finish(proc, within=15)
    assert_one_line_error(result, 130, "error: interrupted")
    assert all(_gone(w, within=5) for w in workers), "a worker was left running"
    assert (tmp_path / "steps.csv").read_text().count("\n") >= 3  # what was measured is kept


@pytest.mark.usefixtures("one_thread")
def test_end_to_end_synthetic_run(tmp_path: Path) -> None:
    result = invoke("train", *TINY, "--epochs", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "done: test accuracy" in result.stdout.splitlines()[-1]
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json", "steps.jsonl", "steps.csv", "epochs.jsonl", "epochs.csv", "faults.jsonl", "faults.csv",
        "model.pt"}
    assert (tmp_path / "faults.jsonl").read_text() == ""  # no worker failed
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and [s["epoch"] for s in steps] == [1, 1, 2, 2]
    assert all(s["step_time_s"] > 0 for s in steps)
    # the first forward runs in the enclave to find the anchors (first and last products); then products go out
    assert steps[0]["bytes_sent"] == 0 and all(s["bytes_sent"] > 0 and s["bytes_received"] > 0 for s in steps[1:])
    with (tmp_path / "steps.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == [s["loss"] for s in steps]
    epochs = [json.loads(line) for line in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(0 <= e["test_accuracy"] <= 1 for e in epochs)
    assert (tmp_path / "epochs.csv").read_text().startswith("epoch,train_loss,train_accuracy,test_loss")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mode"] == "tempo" and config["synthetic_shape"] == [3, 16, 16] and config["workers"] == 2
    model = build_model("timm:test_resnet", num_classes=4, channels=3, image_size=16)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))


@pytest.mark.usefixtures("one_thread")
def test_modes_agree_step_for_step(tmp_path: Path) -> None:
    """Same seed: same initial weights and data order, so offloading changes only float rounding."""
    config = TrainConfig(model="timm:test_resnet", dataset=DatasetName.SYNTHETIC, synthetic_shape=(3, 16, 16),
                         synthetic_classes=4, train_subset=48, test_subset=16, batch_size=16, epochs=1,
                         in_process_workers=True, progress=False, seed=7, offload_anchors=True)
    losses = {}
    for mode in Mode:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = train(dataclasses.replace(config, mode=mode, out=tmp_path / mode.value), log=lambda _: None)
        losses[mode] = torch.tensor([s["loss"] for s in run.steps])
        assert all((s["bytes_sent"] > 0) == (mode is Mode.TEMPO) for s in run.steps)
    assert len(losses[Mode.TEMPO]) == 3
    torch.testing.assert_close(losses[Mode.TEMPO], losses[Mode.ENCLAVE], rtol=1e-4, atol=0)
    variants = {"permute": dict(scheme="permute"), "permute, k2": dict(scheme="permute", key_lifetime=2),
                "mix, anchors inside": dict(offload_anchors=False)}
    for name, changes in variants.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = train(dataclasses.replace(config, **changes, out=tmp_path / name), log=lambda _: None)
        torch.testing.assert_close(torch.tensor([s["loss"] for s in run.steps]), losses[Mode.ENCLAVE],
                                   rtol=1e-4, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    if not torch.cuda.is_available():  # on CUDA, plain mode rounds differently (TF32 convolutions)
        torch.testing.assert_close(losses[Mode.TEMPO], losses[Mode.PLAIN], rtol=1e-4, atol=0)
