"""Confidential inference: the protected model's predictions are plain PyTorch's; `tempo predict` end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tempo
from tempo.enclave.hosting import WorkerOptions
from tempo.inference.model import ModelSpec, build_classifier
from tempo.inference.predictor import Predictor, Protection, open_predictor
from tempo.training.models import build_model
from test_cli import assert_one_line_error, invoke

HOST = ["--in-process-workers", "--workers", "2", "--no-progress"]


def _weights(arch: str, path: Path, *, channels: int = 3, size: int = 16, classes: int = 4) -> dict:
    torch.manual_seed(1)
    state = build_model(arch, num_classes=classes, channels=channels, image_size=size).state_dict()
    torch.save(state, path)
    return state


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("arch", ["small_cnn", "small_vit", "timm:test_resnet"])
@pytest.mark.parametrize("scheme", ["mix", "permute"])
def test_protected_predictions_are_plain_pytorchs(arch: str, scheme: str, tmp_path: Path) -> None:
    spec = ModelSpec(arch, 4, 3, 16)
    state = _weights(arch, tmp_path / "model.pt")
    plain = build_classifier(spec, state, "test")
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        expected = torch.softmax(plain(x), dim=1)
    with tempo.local_workers(2, in_process=True) as pool:
        predictor = Predictor(build_classifier(spec, state, "test"), pool, Protection(scheme=scheme))
        for _ in range(2):  # the first forward learns the anchors (inside); the second offloads all but them
            got = predictor.probabilities(x)
            assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert pool.stats.messages_sent > 0  # products did go to the workers


def test_workers_keep_nothing_between_inference_batches(tmp_path: Path) -> None:
    spec = ModelSpec("small_cnn", 4, 3, 16)
    model = build_classifier(spec, _weights("small_cnn", tmp_path / "m.pt"), "test")
    with open_predictor(model, WorkerOptions(2, in_process=True), Protection(offload_anchors=True)) as predictor:
        for _ in range(3):
            predictor.probabilities(torch.randn(5, 3, 16, 16))
        assert predictor.pool.stats.messages_sent > 0
        assert all(core.kept_handles == 0 and core.kept_bytes == 0 for core in predictor.pool.cores)


def test_predict_on_a_npy_array_writes_one_row_per_input(tmp_path: Path) -> None:
    state = _weights("small_cnn", tmp_path / "model.pt")
    pixels = np.random.default_rng(0).integers(0, 256, (7, 3, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    r = invoke("predict", "--model", "small_cnn", "--model-file", str(tmp_path / "model.pt"), "--num-classes", "4",
               "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "preds.csv"), "--batch-size", "3", *HOST)
    assert r.returncode == 0, r.stderr
    rows = _rows(tmp_path / "preds.csv")
    assert [row["id"] for row in rows] == [str(i) for i in range(7)]
    assert list(rows[0]) == ["id", "prediction", "p0", "p1", "p2", "p3"]
    plain = build_classifier(ModelSpec("small_cnn", 4, 3, 16), state, "test")
    with torch.no_grad():  # uint8 pixels are scaled to [0, 1]; no run config: no normalisation
        expected = torch.softmax(plain(torch.from_numpy(pixels).float() / 255), dim=1)
    got = torch.tensor([[float(row[f"p{k}"]) for k in range(4)] for row in rows])
    assert torch.allclose(got, expected, atol=1e-5)
    assert [int(row["prediction"]) for row in rows] == expected.argmax(1).tolist()
    assert "accuracy" not in r.stdout  # no labels


def test_predict_on_an_image_folder_reports_accuracy(tmp_path: Path) -> None:
    _weights("small_cnn", tmp_path / "model.pt", channels=1)
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(
                tmp_path / "images" / cls / f"{i}.png")
    r = invoke("predict", "--model", "small_cnn", "--model-file", str(tmp_path / "model.pt"), "--num-classes", "4",
               "--data", str(tmp_path / "images"), "--out", str(tmp_path / "preds.csv"), *HOST)
    assert r.returncode == 0, r.stderr
    rows = _rows(tmp_path / "preds.csv")
    assert [row["id"] for row in rows] == [f"{c}/{i}.png" for c in "ab" for i in range(3)]
    correct = sum(int(row["prediction"]) == (0 if row["id"].startswith("a") else 1) for row in rows)
    assert f"accuracy {correct / 6:.2%} ({correct} of 6 labelled inputs)" in r.stdout


def test_predict_with_the_runs_settings_gives_its_test_accuracy(tmp_path: Path) -> None:
    """A run's model.pt with its config.json: architecture, inputs and normalisation come from the run, and the
    accuracy on its test split is the one training reported (same images: test_subset is the whole set here)."""
    from tempo.training.config import TrainConfig
    from tempo.training.loop import train

    config = TrainConfig(model="small_cnn", dataset="synthetic", synthetic_shape=(3, 16, 16), synthetic_classes=4,
                         train_subset=128, test_subset=None, batch_size=32, epochs=1, mode="plain",
                         out=tmp_path / "run", progress=False)
    result = train(config, log=lambda _: None)
    r = invoke("predict", "--model-file", str(tmp_path / "run" / "model.pt"), "--data", "synthetic",
               "--out", str(tmp_path / "preds.csv"), *HOST)
    assert r.returncode == 0, r.stderr
    assert f"accuracy {result.test_accuracy:.2%}" in r.stdout


def _predict(tmp_path: Path, data: str, *extra: str):
    return invoke("predict", "--model-file", str(tmp_path / "model.pt"), "--data", data,
                  "--out", str(tmp_path / "preds.csv"), *HOST, *extra)


def test_predict_errors_name_the_problem(tmp_path: Path) -> None:
    _weights("small_cnn", tmp_path / "model.pt")
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 16, 16), dtype=np.float32))
    small = ["--model", "small_cnn", "--num-classes", "4"]

    assert_one_line_error(_predict(tmp_path, str(tmp_path / "x.npy")), 2, "--model is needed")
    assert_one_line_error(_predict(tmp_path, str(tmp_path / "nowhere"), *small), 2, "nowhere", "does not exist")
    assert_one_line_error(invoke("predict", "--model", "small_cnn", "--model-file", str(tmp_path / "none.pt"),
                                 "--data", str(tmp_path / "x.npy"), *HOST), 2, "none.pt does not exist")
    # a model file that does not fit the architecture: wrong classes, another architecture
    assert_one_line_error(_predict(tmp_path, str(tmp_path / "x.npy"), "--model", "small_cnn"), 2,
                          "does not fit small_cnn", "wrong shapes", "9.weight [4, 128]")
    assert_one_line_error(_predict(tmp_path, str(tmp_path / "x.npy"), "--model", "small_vit", "--num-classes", "4"),
                          2, "does not fit small_vit", "missing keys", "unexpected keys", "0.weight")
    # shape mismatches: channels, and an image size the flattening layer does not take
    np.save(tmp_path / "grey.npy", np.zeros((2, 1, 16, 16), dtype=np.float32))
    assert_one_line_error(_predict(tmp_path, str(tmp_path / "grey.npy"), *small, "--input-shape", "3,16,16"), 2,
                          "grey.npy", "1 channel(s), the model takes 3")
    np.save(tmp_path / "big.npy", np.zeros((2, 3, 24, 24), dtype=np.float32))
    assert_one_line_error(_predict(tmp_path, str(tmp_path / "big.npy"), *small), 2, "wrong shapes", "7.weight")
    np.save(tmp_path / "flat.npy", np.zeros((2, 768), dtype=np.float32))
    assert_one_line_error(_predict(tmp_path, str(tmp_path / "flat.npy"), *small), 2, "[N, C, H, W]", "[2, 768]")
    # unreadable images, named
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / "good.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    assert_one_line_error(_predict(tmp_path, str(tmp_path / "images"), *small), 2, "broken.png",
                          "not a readable image")
    (tmp_path / "model.pt").write_bytes(b"garbage")
    assert_one_line_error(_predict(tmp_path, str(tmp_path / "x.npy"), *small), 2, "cannot load --model-file")
    assert not (tmp_path / "preds.csv").exists()


def test_recorded_inference_traffic_is_attacked_by_the_leakage_suite(tmp_path: Path) -> None:
    """`tempo predict --record` writes what the workers saw and the ground truth; `tempo attack` reads it."""
    import json

    from tempo.training.config import TrainConfig
    from tempo.training.loop import train

    config = TrainConfig(model="small_cnn", dataset="synthetic", synthetic_shape=(1, 16, 16), synthetic_classes=4,
                         train_subset=64, batch_size=32, epochs=1, mode="plain", out=tmp_path / "run",
                         progress=False)
    train(config, log=lambda _: None)
    predict = ["predict", "--model-file", str(tmp_path / "run" / "model.pt"), "--data", "synthetic",
               "--out", str(tmp_path / "preds.csv"), "--batch-size", "500", "--record", str(tmp_path / "rec"), *HOST]
    assert_one_line_error(invoke(*predict), 2, "--record needs --offload-anchors")
    r = invoke(*predict, "--offload-anchors")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "rec" / "truth").glob("step-*.pt"))) == 4  # 2,000 test images in batches of 500
    r = invoke("attack", str(tmp_path / "rec"), "--only", "inputs", "--only", "gram", "--test-size", "100",
               "--aux-size", "10", "--out", str(tmp_path / "leak"))
    assert r.returncode == 0, r.stderr
    findings = json.loads((tmp_path / "leak" / "report.json").read_text())[0]["findings"]
    assert findings["inputs"]["details"]["images"] == 2000  # every query, scored against its true input
    assert 0 <= findings["gram"]["value"] <= 1


def test_predict_with_remote_workers_that_join_with_the_token(tmp_path: Path) -> None:
    """`--listen` / `--token-file` as in training: predict waits for the worker, which runs every product."""
    import socket
    import subprocess
    import sys

    state = _weights("small_cnn", tmp_path / "model.pt")
    pixels = np.random.default_rng(2).random((3, 3, 16, 16), dtype=np.float32)
    np.save(tmp_path / "x.npy", pixels)
    token = tmp_path / "token"
    token.write_bytes(b"t" * 40)
    token.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    worker = subprocess.Popen([sys.executable, "-m", "tempo.cli", "worker", "--connect", address, "--token-file",
                               str(token), "--name", "remote-gpu"], stderr=subprocess.PIPE, text=True)
    try:
        r = invoke("predict", "--model", "small_cnn", "--model-file", str(tmp_path / "model.pt"), "--num-classes",
                   "4", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "preds.csv"), "--listen", address,
                   "--token-file", str(token), "--workers", "1", "--no-progress")
        assert r.returncode == 0, r.stderr
        assert "1 remote (joining on" in r.stderr
        assert worker.wait(timeout=60) == 0  # told to stop when predict ended
    finally:
        worker.kill()
        worker.communicate()
    got = torch.tensor([[float(row[f"p{k}"]) for k in range(4)] for row in _rows(tmp_path / "preds.csv")])
    with torch.no_grad():
        expected = torch.softmax(build_classifier(ModelSpec("small_cnn", 4, 3, 16), state, "t")(
            torch.from_numpy(pixels)), dim=1)
    assert torch.allclose(got, expected, atol=1e-5)
