"""`tempo serve` as a real process, driven by a real HTTP client: batching, bad bodies, a killed worker,
SIGTERM, and a sealed model released after attestation (also through `tempo predict`)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tempo.attestation import dev
from tempo.attestation.policy import Policy
from tempo.attestation.release import KeyServer
from tempo.inference.model import ModelSpec, build_classifier
from tempo.sealed.model import seal_state
from tempo.sealed.stream import new_data_key
from tempo.training.models import build_model
from test_cli import invoke

SPEC = ModelSpec("small_cnn", 4, 3, 16)
MODEL = ["--model", "small_cnn", "--num-classes", "4", "--input-shape", "3,16,16"]
MAX_BATCH = 8
STARTUP_S = 300  # a loaded 2-core machine: importing torch and starting two workers takes a while


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, dict]:
    torch.manual_seed(3)
    state = build_model("small_cnn", num_classes=4, channels=3, image_size=16).state_dict()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(state, path)
    return path, state


def _expected(state: dict, pixels: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch's probabilities for [0, 1] pixels (no run config: no normalisation)."""
    with torch.no_grad():
        return torch.softmax(build_classifier(SPEC, state, "test")(pixels), dim=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tempo serve ...` in its own process, and an HTTP client for it."""

    def __init__(self, *args: str):
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tempo.cli", "serve", "--listen", self.url[7:], *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise AssertionError("the server did not come up")

    def predict(self, pixels: torch.Tensor) -> httpx.Response:
        return self.client.post("/predict", json={"inputs": pixels.tolist()})

    def metrics(self) -> dict:
        return self.client.get("/metrics").json()

    def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit code and everything the server printed."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=120)
        self.client.close()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def server(weights) -> Iterator[Server]:
    s = Server("--model-file", str(weights[0]), *MODEL, "--workers", "2", "--max-batch", str(MAX_BATCH),
               "--max-wait-ms", "3000", "--max-body-mb", "0.25")
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


def _assert_answers(response: httpx.Response, expected: torch.Tensor) -> None:
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    got = torch.tensor([p["probabilities"] for p in predictions])
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert [p["prediction"] for p in predictions] == expected.argmax(1).tolist()


def test_concurrent_requests_are_batched_and_answered_correctly(server, weights) -> None:
    pixels = torch.rand(MAX_BATCH, 3, 16, 16)
    with ThreadPoolExecutor(MAX_BATCH) as pool:  # 8 clients at once, one input each
        responses = list(pool.map(lambda i: server.predict(pixels[i:i + 1]), range(MAX_BATCH)))
    expected = _expected(weights[1], pixels)
    for i, r in enumerate(responses):
        _assert_answers(r, expected[i:i + 1])
    metrics = server.metrics()
    sizes = {int(k): v for k, v in metrics["batch_sizes"].items()}
    assert sum(k * v for k, v in sizes.items()) == MAX_BATCH
    assert max(sizes) > 1, sizes  # requests that arrived within max wait shared a forward
    assert metrics["batches"] < MAX_BATCH
    assert metrics["latency_ms"]["count"] == MAX_BATCH and metrics["latency_ms"]["p99"] >= metrics["latency_ms"]["p50"]


def test_an_image_body_is_answered_like_its_pixels(server, weights) -> None:
    array = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG")
    r = server.client.post("/predict", content=png.getvalue(), headers={"content-type": "image/png"})
    _assert_answers(r, _expected(weights[1], torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255))


@pytest.mark.parametrize(("body", "content_type", "status", "reason"), [
    (b'{"inputs": [[[', "application/json", 400, "not valid JSON"),
    (b"[" * 100_000, "application/json", 400, "too deeply"),
    (b'{"pixels": []}', "application/json", 422, '{"inputs": [...]}'),
    (b'{"inputs": [[1, 2], [3]]}', "application/json", 422, "one shape"),
    (b'{"inputs": [[[[0.5]]]]}', "application/json", 422, "the model takes [batch, 3, 16, 16]"),
    (b'{"inputs": "abc"}', "application/json", 422, "one shape"),
    (b"x" * 300_000, "application/json", 413, "exceeds the limit"),
    (b"\x89PNG not an image", "image/png", 422, "not a readable image"),
    (b"inputs=1", "application/x-www-form-urlencoded", 415, "application/json"),
])
def test_bad_bodies_are_refused_with_a_reason(server, body: bytes, content_type: str, status: int,
                                              reason: str) -> None:
    r = server.client.post("/predict", content=body, headers={"content-type": content_type})
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]


def test_too_many_inputs_in_one_request_are_refused(server) -> None:
    r = server.predict(torch.zeros(MAX_BATCH + 1, 3, 16, 16))
    assert r.status_code == 413 and f"at most {MAX_BATCH}" in r.json()["error"]
    nan = json.dumps({"inputs": torch.full((1, 3, 16, 16), float("nan")).tolist()})  # Python's json reads NaN
    r = server.client.post("/predict", content=nan, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "NaN" in r.json()["error"]


def test_a_killed_worker_is_retired_and_requests_still_answered(server, weights) -> None:
    workers = server.metrics()["workers"]
    assert [w["live"] for w in workers] == [True, True]
    victim = int(workers[0]["name"].split("pid ")[1].rstrip(")"))
    os.kill(victim, signal.SIGKILL)
    for _ in range(3):  # the first request after the kill meets the dead link; every one is answered
        pixels = torch.rand(2, 3, 16, 16)
        _assert_answers(server.predict(pixels), _expected(weights[1], pixels))
    metrics = server.metrics()
    assert [f["kind"] for f in metrics["worker_faults"]] == ["lost"]
    assert [w["live"] for w in metrics["workers"]] == [False, True]
    assert server.client.get("/health").json()["live_workers"] == 1


def test_sigterm_stops_the_server_and_its_workers(server) -> None:
    pids = [int(w["name"].split("pid ")[1].rstrip(")")) for w in server.metrics()["workers"]]
    code, out = server.stop()
    assert code == 0, out
    assert "stopped: workers shut down" in out and "Traceback" not in out
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


# ------------------------------------------------------------------------------------------------
# A sealed model: the key is released only to an attested enclave (dev backend here).

@pytest.fixture
def sealed_model(weights, tmp_path) -> Iterator[tuple[Path, list[str]]]:
    """(model.sealed, the options that release its key from a key server running in this process)."""
    data_key = new_data_key()
    sealed = seal_state(weights[1], tmp_path / "model.sealed", data_key, run_id="0" * 32, step=1)
    dev_key = tmp_path / "dev.pem"
    dev.create_signing_key(dev_key)
    public = dev.public_key_hex(dev.load_signing_key(dev_key))
    ks = KeyServer(data_key, Policy(frozenset({(dev.BACKEND, dev.measure())}), frozenset({public})), timeout=30)
    host, port = ks.bind("127.0.0.1", 0)
    stop = threading.Event()
    thread = threading.Thread(target=ks.serve_forever, args=(stop,), daemon=True)
    thread.start()
    yield sealed, ["--bundle", str(sealed), "--keyserver", f"{host}:{port}", "--attestation", "dev",
                   "--dev-key", str(dev_key)]
    stop.set()
    thread.join()
    ks.close()


def test_a_sealed_model_predicts_and_serves_like_the_plain_one(sealed_model, weights, tmp_path) -> None:
    _, release = sealed_model
    pixels = torch.rand(5, 3, 16, 16)
    np.save(tmp_path / "x.npy", pixels.numpy())
    r = invoke("predict", *release, *MODEL, "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv"),
               "--in-process-workers", "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "model key released" in r.stderr
    rows = [line.split(",") for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    got = torch.tensor([[float(v) for v in row[2:]] for row in rows])
    assert torch.allclose(got, _expected(weights[1], pixels), atol=1e-5)

    s = Server(*release, *MODEL, "--workers", "1")
    try:
        _assert_answers(s.predict(pixels), _expected(weights[1], pixels))
    finally:
        code, out = s.stop()
    assert code == 0, out
    assert "model key released" in out


def test_a_sealed_model_needs_its_key_released(sealed_model, tmp_path) -> None:
    sealed, _ = sealed_model
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 16, 16), dtype=np.float32))
    r = invoke("predict", "--bundle", str(sealed), *MODEL, "--data", str(tmp_path / "x.npy"))
    assert r.returncode == 2 and "--bundle needs --keyserver" in r.stderr
    r = invoke("predict", "--bundle", str(sealed), "--model-file", str(sealed), *MODEL, "--data",
               str(tmp_path / "x.npy"))
    assert r.returncode == 2 and "--model-file FILE (a state_dict) or --bundle FILE" in r.stderr


def _in_process_app(weights, cores: list):
    """The app over in-process workers `cores` (lying workers cannot be started from the command line)."""
    from contextlib import contextmanager

    from starlette.testclient import TestClient

    from tempo.enclave.pools import InProcessPool
    from tempo.inference.batching import Batcher
    from tempo.inference.predictor import Predictor, Protection
    from tempo.inference.server import create_app

    @contextmanager
    def predictor():
        pool = InProcessPool(len(cores), cores=cores)
        yield Predictor(build_classifier(SPEC, weights[1], "test"), pool, Protection(offload_anchors=True))

    batcher = Batcher(predictor, max_batch=4, max_wait=0)
    batcher.start()
    return TestClient(create_app(batcher, SPEC, max_body_bytes=1 << 20))


def test_a_lying_worker_is_retired_and_the_request_still_answered(weights) -> None:
    """The second worker scales every result it returns."""
    from tempo.testing.faults import Lie, LyingWorkerCore
    from tempo.worker.core import WorkerCore

    pixels = torch.rand(4, 3, 16, 16)
    with pytest.warns(UserWarning, match="lied"), _in_process_app(weights, [WorkerCore(),
                                                                          LyingWorkerCore(Lie.SCALE)]) as c:
        r = c.post("/predict", json={"inputs": pixels.tolist()})
        metrics = c.get("/metrics").json()
    _assert_answers(r, _expected(weights[1], pixels))
    assert [f["kind"] for f in metrics["worker_faults"]] == ["lied"]
    assert [w["live"] for w in metrics["workers"]] == [True, False]


def test_with_no_honest_worker_left_the_request_gets_503_with_the_reason(weights) -> None:
    from tempo.testing.faults import Lie, LyingWorkerCore

    with _in_process_app(weights, [LyingWorkerCore(Lie.ZERO_ROW)]) as c:
        r = c.post("/predict", json={"inputs": torch.rand(2, 3, 16, 16).tolist()})
        assert r.status_code == 503 and "integrity check failed" in r.json()["error"]
        assert c.get("/metrics").json()["responses"] == {"503": 1}
