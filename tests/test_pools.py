"""Worker pools: real processes give the same results; hostile or dead workers fail clearly."""

from __future__ import annotations

import os
import signal
import tempfile

import pytest
import torch
from torch import nn

import tempo
from conftest import compare_with_plain, protect_quietly
from tempo.enclave.distributed import ProcessPool
from tempo.errors import ConfigError, WorkerLostError
from tempo.wire import Failure, ForwardJob


def test_process_workers_match_plain():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    with tempo.local_workers(2) as pool:
        compare_with_plain(model, [torch.randn(3, 3, 6, 6)], pool)
        assert pool.stats.bytes_sent > 0 and pool.stats.messages_received == pool.stats.messages_sent


def test_process_worker_answers_a_bad_job_with_a_failure():
    with tempo.local_workers(1) as pool:
        reply = pool.call(0, ForwardJob(1, 1, "linear", {}, torch.randn(2, 3), torch.randn(4, 5), False, False))
        assert isinstance(reply, Failure) and "linear needs" in reply.message
        reply = pool.call(0, ForwardJob(2, 2, "os.system", {}, torch.randn(2, 3), torch.randn(4, 5), False, False))
        assert isinstance(reply, Failure) and "unknown product kind" in reply.message


def test_killed_last_worker_is_named_in_the_error():
    """With no other worker to take over (tests/test_faults.py covers the takeover), the run stops."""
    with tempo.local_workers(1, timeout=30) as pool:
        model = protect_quietly(nn.Linear(4, 4), pool)
        model(torch.randn(2, 4)).sum().backward()
        os.kill(pool._procs[0].pid, signal.SIGKILL)
        pool._procs[0].wait()
        with pytest.raises(WorkerLostError, match=r"worker-0 .*exited with code -9"):
            model(torch.randn(2, 4))


def test_stalled_worker_times_out():
    with tempo.local_workers(1, timeout=0.5) as pool:
        os.kill(pool._procs[0].pid, signal.SIGSTOP)
        try:
            with pytest.raises(tempo.WorkerError, match=r"(sent nothing|took no message) for 0\.5 s"):
                protect_quietly(nn.Linear(4, 4), pool)(torch.randn(2, 4))
        finally:
            os.kill(pool._procs[0].pid, signal.SIGCONT)


def test_local_workers_join_over_loopback_and_the_token_file_is_gone(monkeypatch):
    """Local processes use the remote workers' transport: a rendezvous on 127.0.0.1 and a one-time token,
    whose file is deleted once every worker has joined."""
    made = []
    real = tempfile.TemporaryDirectory

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    with tempo.local_workers(2) as pool:
        assert pool.address.startswith("127.0.0.1:") and sorted(pool.joined) == ["worker-0", "worker-1"]
        assert [pool.name(i).split()[0] for i in range(2)] == ["worker-0", "worker-1"]
        assert made and not os.path.exists(made[0].name)


def test_a_worker_process_that_cannot_start_is_named(capfd):
    with pytest.raises(WorkerLostError, match=r"worker-0 \(pid \d+\) exited with code 2 before it joined"):
        ProcessPool(1, device="no-such-device:0", join_timeout=60)
    assert "unknown device 'no-such-device:0'" in capfd.readouterr().err


def test_an_unknown_device_is_refused_in_process():
    with pytest.raises(ConfigError, match="unknown device 'gpu9'"):
        tempo.local_workers(1, in_process=True, device="gpu9")


def test_at_least_one_worker():
    with pytest.raises(ConfigError, match="at least one worker"):
        tempo.local_workers(0)


def test_worker_memory_is_freed():
    """Kept operands are freed by the backward, never kept under no_grad, released if unused."""
    with tempo.local_workers(1, in_process=True) as pool:
        core = pool.cores[0]
        model = protect_quietly(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)), pool)
        for _ in range(3):
            model(torch.randn(3, 6)).sum().backward()
            assert core.kept_handles == 0
        with torch.no_grad():
            model(torch.randn(3, 6))
        assert core.kept_handles == 0
        out = model(torch.randn(3, 6))  # forward whose backward never comes
        assert core.kept_handles == 2
        del out
        model(torch.randn(3, 6)).sum().backward()  # the next jobs carry the release
        assert core.kept_handles == 0
