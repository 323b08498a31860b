"""Checkpoints and --resume: a run killed mid-epoch and resumed ends with the uninterrupted run's model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tempo.training.checkpoints import CheckpointError, PlainCheckpoints
from test_cli import assert_one_line_error, invoke

RUN = ["--mode", "enclave", "--model", "small_cnn", "--train-subset", "3200", "--test-subset", "200",
       "--batch-size", "32", "--epochs", "2", "--checkpoint-every", "5", "--no-progress"]  # 100 steps an epoch


def _tempo(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tempo.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_a_run_killed_mid_epoch_resumes_to_the_same_model(tmp_path):
    whole = _tempo(*RUN, "--out", str(tmp_path / "whole"))
    assert whole.wait(timeout=600) == 0, whole.stderr.read()

    killed = _tempo(*RUN, "--out", str(tmp_path / "killed"))
    checkpoints = PlainCheckpoints(tmp_path / "killed" / "checkpoints")
    deadline = time.monotonic() + 300
    while not [s for s in checkpoints.steps() if s >= 110] and killed.poll() is None:  # inside epoch 2
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "model.pt").exists()
    newest = checkpoints.steps()[-1]
    assert 110 <= newest < 200 and len(checkpoints.steps()) <= 3  # the newest three are kept

    resumed = _tempo(*RUN, "--out", str(tmp_path / "killed"), "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resumed from the checkpoint of step {newest} (epoch 2, {newest - 100} of 100 batches done)" in out
    want = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    got = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    def losses(run: str) -> list[tuple]:
        rows = [json.loads(line) for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]
        return [(r["step"], r["epoch"], r["loss"], r["accuracy"]) for r in rows]

    assert losses("killed") == losses("whole") and len(losses("whole")) == 200  # the metrics, too


def test_a_checkpoint_replayed_under_a_newer_name_is_refused(tmp_path):
    store = PlainCheckpoints(tmp_path)
    store.save({"step": 5, "x": torch.ones(1)}, 5)
    store.save({"step": 10, "x": torch.ones(1)}, 10)
    store.path(5).replace(store.path(10))
    with pytest.raises(CheckpointError, match="holds step 5, not 10: an older checkpoint replayed"):
        store.resume()
    (tmp_path / "step-00000010.pt").write_bytes(b"garbage")
    store.save({"step": 5, "x": torch.ones(1)}, 5)
    with pytest.raises(CheckpointError, match=r"step 10 is not valid: .* pass --resume-step with one of \[5\]"):
        store.resume()
    assert store.resume(5)["step"] == 5


def test_resume_options_are_checked(tmp_path):
    assert_one_line_error(invoke("train", "--resume"), 2, "--resume needs --out")
    assert_one_line_error(invoke("train", "--resume-step", "3", "--out", str(tmp_path)), 2, "goes with --resume")
    r = invoke("train", "--mode", "plain", "--model", "small_cnn", "--train-subset", "64", "--batch-size", "32",
               "--epochs", "1", "--test-subset", "100", "--no-progress", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert_one_line_error(invoke("train", "--mode", "plain", "--model", "small_cnn", "--train-subset", "64",
                                 "--batch-size", "32", "--epochs", "2", "--test-subset", "100", "--no-progress",
                                 "--out", str(tmp_path / "run"), "--resume"), 2, "other settings", "epochs")
    assert_one_line_error(invoke("train", "--mode", "plain", "--model", "small_cnn", "--train-subset", "64",
                                 "--batch-size", "32", "--epochs", "1", "--test-subset", "100", "--no-progress",
                                 "--out", str(tmp_path / "run"), "--resume"), 2, "no checkpoint to resume from")
