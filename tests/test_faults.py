"""Workers that die, stall or lie mid-run: their work moves to the others and the model is unchanged."""

from __future__ import annotations

import json
import os
import signal
import warnings

import pytest
import torch
from torch import nn

import tempo
from conftest import protect_quietly
from tempo.enclave.distributed import ProcessPool
from tempo.enclave.pools import InProcessPool
from tempo.errors import WorkerLostError
from tempo.testing.faults import Lie, LyingWorkerCore
from tempo.training.config import TrainConfig
from tempo.training.loop import train
from tempo.worker.core import WorkerCore

STEPS = 6


def _train(pool, *, fault=None) -> tuple[nn.Module, list[dict]]:
    """STEPS SGD steps of a small MLP on fixed data; `fault(step)` runs before each step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    net = protect_quietly(model, pool, scheme="mix")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.randn(STEPS, 16, 20, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 5, (STEPS, 16), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(STEPS):
            if fault is not None:
                fault(step)
            opt.zero_grad()
            nn.functional.cross_entropy(net(data[step]), labels[step]).backward()
            opt.step()
    return model, net.engine.faults


@pytest.fixture(scope="module")
def fault_free() -> nn.Module:
    return _train(InProcessPool(3))[0]


def _same(model: nn.Module, reference: nn.Module) -> None:
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_a_lying_worker_is_quarantined_and_its_work_redone(fault_free):
    pool = InProcessPool(3, cores=[WorkerCore(), LyingWorkerCore(Lie.SCALE, honest_jobs=7), WorkerCore()])
    model, faults = _train(pool)
    _same(model, fault_free)
    assert [(f["worker"], f["kind"]) for f in faults] == [("inproc-1", "lied")]
    assert pool.cores[1].honest_jobs == -1  # it lied on its 8th job and got no job after it


def test_a_killed_worker_process_is_replaced_mid_run(fault_free):
    with ProcessPool(3, timeout=30) as pool:
        def kill(step: int) -> None:
            if step == 2:
                os.kill(pool._procs[1].pid, signal.SIGKILL)
                pool._procs[1].wait()

        model, faults = _train(pool, fault=kill)
    _same(model, fault_free)
    assert [f["kind"] for f in faults] == ["lost"] and "worker-1" in faults[0]["worker"]


def test_a_stalled_worker_is_replaced_after_the_timeout(fault_free):
    with ProcessPool(3, timeout=5) as pool:
        def stall(step: int) -> None:
            if step == 3:
                os.kill(pool._procs[2].pid, signal.SIGSTOP)

        try:
            model, faults = _train(pool, fault=stall)
        finally:
            os.kill(pool._procs[2].pid, signal.SIGKILL)
    _same(model, fault_free)
    assert [f["kind"] for f in faults] == ["stalled"]


def test_with_no_worker_left_the_run_stops_with_the_error():
    with ProcessPool(1, timeout=30) as pool:
        def kill(step: int) -> None:
            if step == 1:
                os.kill(pool._procs[0].pid, signal.SIGKILL)
                pool._procs[0].wait()

        with pytest.raises(WorkerLostError, match="worker-0"):
            _train(pool, fault=kill)


def test_faults_are_logged_in_the_runs_metrics(tmp_path, monkeypatch):
    """A lying worker in `tempo train`: the run completes and faults.jsonl names it, the op and the step."""
    real = tempo.local_workers

    def with_a_liar(n, **kwargs):
        return InProcessPool(n, cores=[WorkerCore(), LyingWorkerCore(Lie.ZERO_ROW, honest_jobs=1)])

    monkeypatch.setattr(tempo, "local_workers", with_a_liar)
    run = train(TrainConfig(model="small_cnn", train_subset=192, test_subset=100, batch_size=64, epochs=1,
                            workers=2, in_process_workers=True, progress=False, out=tmp_path / "run"),
                log=lambda _: None)
    monkeypatch.setattr(tempo, "local_workers", real)
    (fault,) = [json.loads(line) for line in (run.out_dir / "faults.jsonl").read_text().splitlines()]
    assert fault["worker"] == "inproc-1" and fault["kind"] == "lied" and fault["step"] >= 1 and fault["op"]


def test_with_no_worker_left_the_last_completed_step_is_checkpointed_and_resumes(tmp_path, monkeypatch):
    """The only worker lies in step 2: the run stops with a checkpoint of step 1, and --resume (with an honest
    worker) ends with the model of a run that never failed."""
    config = TrainConfig(model="small_cnn", train_subset=320, test_subset=100, batch_size=64, epochs=1, workers=1,
                         in_process_workers=True, progress=False, offload_anchors=True, out=tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = train(config.__class__(**{**config.__dict__, "out": tmp_path / "whole"}), log=lambda _: None)
        real = tempo.local_workers
        monkeypatch.setattr(tempo, "local_workers",
                            lambda n, **_: InProcessPool(1, cores=[LyingWorkerCore(Lie.SCALE, honest_jobs=8)]))
        with pytest.raises(tempo.WorkerError, match=r"last completed step \(1\) is checkpointed in .*step-00000001"):
            train(config, log=lambda _: None)
        monkeypatch.setattr(tempo, "local_workers", real)
        resumed = train(config, log=lambda _: None, resume=True)
    assert [s["loss"] for s in resumed.steps] == pytest.approx([s["loss"] for s in whole.steps], rel=1e-4)
    want = torch.load(whole.out_dir / "model.pt", weights_only=True)
    got = torch.load(resumed.out_dir / "model.pt", weights_only=True)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
