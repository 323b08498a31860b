"""Recording a run for the leakage suite: exact, off by default, and invisible to the workers."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import tempo
from tempo.attacks.transcript import load, scoring
from tempo.enclave.pools import InProcessPool
from tempo.enclave.truth import GroundTruth
from tempo.errors import ConfigError, DatasetError, ProtocolError
from tempo.testing.recording import RecordingPool
from tempo.training.config import TrainConfig
from tempo.wire import transcript
from tempo.wire.messages import BackwardJob, ForwardJob, Result
from tempo.worker.core import WorkerCore
from tempo.worker.recorder import RecordingCore
from test_cli import invoke

pytestmark = pytest.mark.filterwarnings("ignore:tempo. recording ground truth")


def _train(pool, steps: int = 3, *, truth: GroundTruth | None = None, scheme: str = "permute",
           key_lifetime: int = 1) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = tempo.protect(model, pool, scheme=scheme, key_seed=7, truth=truth, key_lifetime=key_lifetime,
                            offload_anchors=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(steps):
        x, y = torch.randn(4, 6, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1, 2, 0])
        if truth is not None:
            truth.begin_step(net.engine.step + 1, model.state_dict(), x, y)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        with torch.no_grad():
            net.eval()(x)  # evaluation traffic: not part of a training step, not recorded
        net.train()
    if truth is not None:
        truth.flush()


def test_transcript_round_trips(tmp_path: Path) -> None:
    job = ForwardJob(job_id=3, handle=2, kind="linear", params={}, x=torch.randn(4, 6), w=torch.randn(5, 6),
                     keep_x=True, keep_w=False, release=(1,))
    reply = Result(3, {"y": torch.randn(4, 5, dtype=torch.float64)})
    back = BackwardJob(job_id=4, handle=2, dy=torch.randn(4, 5), need_dx=False, need_dw=True)
    path = tmp_path / "t.tr"
    transcript.append(path, [job, reply])
    transcript.append(path, [back])
    got = list(transcript.read(path))
    assert [type(m) for m in got] == [ForwardJob, Result, BackwardJob]
    assert torch.equal(got[0].x, job.x) and torch.equal(got[0].w, job.w) and got[0].release == (1,)
    assert got[1].tensors["y"].dtype == torch.float64 and torch.equal(got[1].tensors["y"], reply.tensors["y"])
    assert torch.equal(got[2].dy, back.dy) and got[2].need_dw and not got[2].need_dx


def test_truncated_transcript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.tr"
    transcript.append(path, [Result(1, {"y": torch.randn(8, 8)})])
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ProtocolError, match="truncated"):
        list(transcript.read(path))


def test_recording_changes_nothing_workers_are_sent(tmp_path: Path) -> None:
    plain, recorded = RecordingPool(InProcessPool(1)), RecordingPool(InProcessPool(1, record=tmp_path / "view"))
    _train(plain)
    _train(recorded, truth=GroundTruth(tmp_path / "truth"))
    assert len(plain.received) == len(recorded.received) > 0
    for (field_a, a), (field_b, b) in zip(plain.received + plain.returned, recorded.received + recorded.returned,
                                          strict=True):
        assert field_a == field_b and torch.equal(a, b)


def test_recording_is_off_by_default(tmp_path: Path) -> None:
    assert TrainConfig().record is None
    with tempo.local_workers(2, in_process=True) as pool:
        assert all(type(core) is WorkerCore for core in pool.cores)


@pytest.mark.parametrize("key_lifetime", [1, 3])
def test_recorded_view_and_truth_agree(tmp_path: Path, key_lifetime: int) -> None:
    """The worker's W' is exactly the step's plaintext weight under the recorded key; eval traffic is skipped.

    With a key lifetime the recorded W' is the resident copy the worker used, updated by the worker itself.
    """
    _train(InProcessPool(1, record=tmp_path / "view"), steps=4, truth=GroundTruth(tmp_path / "truth"),
           key_lifetime=key_lifetime)
    (tmp_path / "config.json").write_text('{"scheme": "permute", "model": "mlp"}')
    t = load(tmp_path)
    assert [s.step for s in t.steps] == [1, 2, 3, 4]
    with scoring():
        for step in t.steps:
            assert [step.op_truth(op).name for op in step.ops] == ["0", "2"]
            for op, param in zip(step.ops, ("0.weight", "2.weight"), strict=True):
                key = step.op_truth(op).key
                w = step.truth.params[param]
                assert torch.equal(op.w, w[key["out"]][:, key["inner"]])
                assert op.dy is not None and op.dw is not None
            first, key = step.ops[0], step.op_truth(step.ops[0]).key
            assert torch.equal(first.x, step.truth.inputs[key["row"]][:, key["inner"]])
        if key_lifetime > 1:  # the weight's axes keep their key for 3 steps; rows get a fresh one every time
            keys = [step.op_truth(step.ops[0]).key for step in t.steps]
            assert all(torch.equal(keys[0][axis], k[axis]) for k in keys[1:3] for axis in ("inner", "out"))
            assert not torch.equal(keys[2]["out"], keys[3]["out"])
            assert not any(torch.equal(a["row"], b["row"]) for a, b in itertools.pairwise(keys))


def test_only_the_last_steps_are_kept(tmp_path: Path) -> None:
    _train(InProcessPool(1, record=tmp_path / "view", record_steps=2), steps=5,
           truth=GroundTruth(tmp_path / "truth", keep_steps=2))
    assert sorted(p.name for p in (tmp_path / "view" / "worker-0").iterdir()) == ["step-000004.tr", "step-000005.tr"]
    assert sorted(p.name for p in (tmp_path / "truth").iterdir()) == ["step-000004.pt", "step-000005.pt"]


def test_process_workers_record_their_traffic(tmp_path: Path) -> None:
    with tempo.local_workers(2, record=tmp_path / "view") as pool:
        _train(pool, steps=2, truth=GroundTruth(tmp_path / "truth"))
    (tmp_path / "config.json").write_text('{"scheme": "permute", "model": "mlp"}')
    t = load(tmp_path)
    assert len(t.steps) == 2 and all(len(s.ops) == 2 for s in t.steps)  # two workers, one op each, pooled


def test_recording_core_records_training_jobs_only(tmp_path: Path) -> None:
    core = RecordingCore(tmp_path)
    job = ForwardJob(job_id=1, handle=1, kind="linear", params={}, x=torch.randn(2, 3), w=torch.randn(4, 3),
                     keep_x=False, keep_w=False)
    assert isinstance(core.handle(job), Result)
    assert list(tmp_path.iterdir()) == []


def test_loading_bad_recordings(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no config\.json"):
        load(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"scheme": "none"}')
    with pytest.raises(DatasetError, match="no worker transcripts"):
        load(tmp_path)
    (tmp_path / "config.json").write_text('{"scheme": "permute", "offload_anchors": false}')
    with pytest.raises(ConfigError, match="record with --offload-anchors"):
        load(tmp_path)


def test_cli_refuses_record_without_workers_and_unknown_attacks(tmp_path: Path) -> None:
    r = invoke("train", "--mode", "plain", "--record", str(tmp_path / "r"), "--no-progress")
    assert r.returncode == 2 and "--record needs --mode tempo" in r.stderr
    r = invoke("attack", str(tmp_path), "--only", "telepathy")
    assert r.returncode == 2 and "unknown attack" in r.stderr
    r = invoke("attack", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "no config.json" in r.stderr


def test_recording_window_can_end_mid_run(tmp_path: Path) -> None:
    _train(InProcessPool(1, record=tmp_path / "view", record_steps=2, record_until=3), steps=6,
           truth=GroundTruth(tmp_path / "truth", keep_steps=2, until=3))
    assert sorted(p.name for p in (tmp_path / "view" / "worker-0").iterdir()) == ["step-000002.tr", "step-000003.tr"]
    assert sorted(p.name for p in (tmp_path / "truth").iterdir()) == ["step-000002.pt", "step-000003.pt"]
