"""Workers with the token that answer jobs with hostile replies (issue 16, findings 3 and 4, the slow worker,
peer text in logs): each is retired and its work redone, the enclave neither crashes nor grows."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import protect_quietly
from tempo.enclave.distributed import DistributedPool
from tempo.enclave.pace import Pace
from tempo.enclave.pools import InProcessPool
from tempo.wire.messages import Job, Reply
from tempo.worker.core import WorkerCore

TOKEN = b"a-secret-token-of-at-least-32-bytes-long"

# One process per mode (forked from one that imported torch), in a process group of its own: each joins
# under its mode's name and answers its first job as the mode says ("honest": every job honestly; "slow":
# honestly, after a sleep).
ROGUES = r"""
import os, struct, sys, time, torch
from pathlib import Path
from tempo.wire.codec import encode
from tempo.wire.dist import connect, read_token
from tempo.wire.messages import Failure, Result, Shutdown
from tempo.worker.core import WorkerCore

def frame(head, body=b""):
    return struct.pack("<I", len(head)) + head + body

def spec(shape):
    return b'{"type": "Result", "job_id": %d, "tensors": [{"name": "y", "dtype": "float32", "shape": %s}]}' % (
        JOB, str(shape).encode())

def answer(mode, job):
    global JOB
    JOB = job.job_id
    return {
        "type-list": lambda: frame(b'{"type": []}'),
        "nested": lambda: frame(b'{"type": "Result", "job_id": 1, "tensors": [], "x": ' + b"[" * 5000
                                + b"]" * 5000 + b"}"),
        "bigint": lambda: frame(b'{"type": "Failure", "job_id": ' + b"9" * 5000 + b', "message": "", "tensors": []}'),
        "dim-2**63": lambda: frame(spec([0, 2**63])),
        "strides": lambda: frame(spec([0, 2**62, 2**62])),
        "dtype-list": lambda: frame(spec([1]).replace(b'"float32"', b"[]"), b"\0" * 4),
        "escape": lambda: encode(Failure(JOB, "\x1b[2J\x1b]0;pwned\x07\r\nFAKE LOG LINE")),
        "huge": lambda: encode(Result(JOB, {"y": torch.zeros(32 << 20)})),  # 128 MiB
    }[mode]()

def serve(link, mode):
    core = WorkerCore("cpu")
    while not isinstance(job := link.recv(), Shutdown):
        if mode in ("honest", "slow"):
            reply = core.handle(job)
            time.sleep(3.0 if mode == "slow" else 0)
            link.send(reply)
            continue
        raw = answer(mode, job)
        link.group.send([torch.tensor([len(raw)], dtype=torch.int64)], 0, 0).wait()
        payload = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        sending = link.group.send([payload], 0, 1)  # not waited for: the enclave may refuse it unread
        link.recv()  # stay until the enclave hangs up
        del sending

token = read_token(Path(sys.argv[2]))
for mode in sys.argv[3:]:  # one process per link, forked once torch is imported
    if os.fork() == 0:
        serve(connect(sys.argv[1], token, mode, timeout=120), mode)
        os._exit(0)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pool_with_rogues(tmp_path: Path, modes: list[str]) -> tuple[DistributedPool, subprocess.Popen]:
    """A pool whose workers are the threads of one rogue process, one per mode, in that order."""
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN)
    token_file.chmod(0o600)
    address, made = f"127.0.0.1:{_free_port()}", {}

    def listen() -> None:
        made["pool"] = DistributedPool(len(modes), listen=address, token=TOKEN, timeout=30, join_timeout=120,
                                       log=lambda _: None)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    rogues = subprocess.Popen([sys.executable, "-c", ROGUES, address, str(token_file), *modes],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    thread.join(timeout=150)
    if "pool" not in made:
        _stop(rogues)
        pytest.fail(f"the rogues did not join: {rogues.communicate()[1][-2000:]}")
    return made["pool"], rogues


def _stop(rogues: subprocess.Popen) -> None:
    """Kill the rogue process and the children it forked (its own process group)."""
    os.killpg(rogues.pid, signal.SIGKILL)
    rogues.wait()


def _train(pool, steps: int, *, until=None) -> tuple[nn.Module, list[dict]]:
    """`steps` SGD steps of a small MLP on fixed data (the second layer sharded over every live worker)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    net = protect_quietly(model, pool, scheme="mix")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(steps, 48, 12, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (steps, 48), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in zip(data, labels, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return model, net.engine.faults


def _same(model: nn.Module, reference: nn.Module) -> None:
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


CRASHERS = ["type-list", "nested", "bigint", "dim-2**63", "strides", "dtype-list"]


def test_workers_whose_replies_used_to_crash_the_decoder_are_retired_as_malformed(tmp_path):
    """Finding 3: before, each of these replies raised TypeError, RecursionError, ValueError or a torch error
    out of the round and ended the run; now each rogue is retired ('malformed') and the honest worker
    redoes its work, so the model is the fault-free one. Finding 5: a Failure message full of terminal
    escapes reaches the fault log escaped."""
    pool, rogues = _pool_with_rogues(tmp_path, [*CRASHERS, "escape", "honest"])
    try:
        model, faults = _train(pool, 3)
    finally:
        pool.close()
        _stop(rogues)
    _same(model, _train(InProcessPool(1), 3)[0])
    kinds = {f["worker"].split("'")[1]: f["kind"] for f in faults}
    assert kinds == {**dict.fromkeys(CRASHERS, "malformed"), "escape": "failed"}, faults
    (escaped,) = [f["detail"] for f in faults if f["kind"] == "failed"]
    assert "\x1b" not in escaped and "\x07" not in escaped and "\n" not in escaped and "\\x1b[2J" in escaped


def test_a_reply_far_larger_than_the_job_expects_is_refused_unread(tmp_path):
    """Finding 4: a 128 MiB reply to a job that expects a few KB is refused by its announced length."""
    pool, rogues = _pool_with_rogues(tmp_path, ["huge", "honest"])
    try:
        model, faults = _train(pool, 2)
    finally:
        pool.close()
        _stop(rogues)
    (fault,) = faults
    assert fault["kind"] == "malformed" and "'huge'" in fault["worker"]
    announced = int(re.search(r"announced a (\d+)-byte message", fault["detail"])[1])
    assert announced > 128 << 20 and "limit 1" in fault["detail"], fault
    _same(model, _train(InProcessPool(1), 2)[0])


ENCLAVE = r"""
import re, sys, torch
from torch.distributed import TCPStore
from tempo.errors import ProtocolError
from tempo.wire.dist import PairTransport, pair_group
from tempo.wire.messages import Result

def high_water():
    return int(re.search(r"VmHWM:\s*(\d+) kB", open("/proc/self/status").read())[1]) << 10

store = TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False)
link = PairTransport(pair_group(store, 1, 0, 60, "127.0.0.1"), me=0, peer="rogue", send_timeout=60)
link.send(Result(1, {"y": torch.ones(4, 4)}))  # both directions warmed up before measuring
link.recv(timeout=60)
before = high_water()
try:
    link.recv(timeout=60, payload_bytes=4 * 1024)
except ProtocolError as e:
    print("refused:", e)
print("grew", high_water() - before)
"""

HUGE_REPLY = r"""
import sys, torch
from torch.distributed import TCPStore
from tempo.wire.codec import encode
from tempo.wire.dist import PairTransport, pair_group
from tempo.wire.messages import Result

store = TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False)
link = PairTransport(pair_group(store, 1, 1, 60, "127.0.0.1"), me=1, peer="enclave", send_timeout=60)
link.recv(timeout=60)
link.send(Result(1, {"y": torch.ones(4, 4)}))
link.send(Result(2, {"y": torch.zeros(32 << 20)}))  # 128 MiB
link.flush()  # the enclave never takes it: killed here
"""


def test_a_refused_reply_does_not_grow_the_enclave(tmp_path):
    """Finding 4, measured: the enclave's peak RSS (VmHWM, in its own process) hardly moves while a 128 MiB
    reply to a 4 KiB job is refused. Before the fix it grew by the reply three times over."""
    port = _free_port()
    enclave = subprocess.Popen([sys.executable, "-c", ENCLAVE, str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the store listens before the rogue connects (it retries anyway)
    rogue = subprocess.Popen([sys.executable, "-c", HUGE_REPLY, str(port)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        out, err = enclave.communicate(timeout=120)
    finally:
        rogue.kill()
        rogue.wait()
    assert enclave.returncode == 0, err
    assert int(re.search(r"refused: rogue announced a (\d+)-byte message", out)[1]) > 128 << 20, out
    grew = int(out.split("grew ")[1])
    assert grew < 32 << 20, f"peak RSS grew by {grew >> 20} MiB while refusing a 128 MiB reply"


class SleepyCore(WorkerCore):
    """An honest worker that, after `fast_jobs` jobs, sleeps before every answer: correct, but crawling."""

    def __init__(self, fast_jobs: int, sleep_s: float):
        super().__init__("cpu")
        self.fast_jobs, self.sleep_s, self.jobs = fast_jobs, sleep_s, 0

    def handle(self, job: Job) -> Reply:
        self.jobs += 1
        if self.jobs > self.fast_jobs:
            time.sleep(self.sleep_s)
        return super().handle(job)


def test_a_worker_far_slower_than_its_peers_is_retired_as_slow():
    """A worker that answers correctly but far slower than the others on the same ops (here 1.5 s against a
    few ms, judged with a 0.3 s floor: margins of 5x and hundreds of x) is retired as 'slow' on its second
    slow reply; its answers were right, so the model is the fault-free one, and it gets no job after."""
    sleepy = SleepyCore(fast_jobs=4, sleep_s=1.5)
    pool = InProcessPool(3, cores=[WorkerCore("cpu"), sleepy, WorkerCore("cpu")])
    pool.pace = Pace(floor_s=0.3)
    model, faults = _train(pool, 4)
    assert [(f["worker"], f["kind"]) for f in faults] == [("inproc-1", "slow")], faults
    assert "slower than the other workers in 2 of its last" in faults[0]["detail"]
    assert sleepy.jobs == 6  # its 4 fast jobs and 2 slow ones, then nothing
    _same(model, _train(InProcessPool(1), 4)[0])


def test_a_slow_remote_worker_is_retired_as_slow(tmp_path):
    """The same over links, where the enclave times a reply from its job's send to its receipt (3 s against
    milliseconds, with a 0.5 s floor)."""
    pool, rogues = _pool_with_rogues(tmp_path, ["honest", "slow"])
    pool.pace = Pace(floor_s=0.5)
    try:
        model, faults = _train(pool, 4)
    finally:
        pool.close()
        _stop(rogues)
    assert [(f["worker"].split("'")[1], f["kind"]) for f in faults] == [("slow", "slow")], faults
    _same(model, _train(InProcessPool(1), 4)[0])


@pytest.mark.parametrize(("peers", "times", "slow"), [
    ([0.001] * 3, [0.2, 0.2, 0.2], False),  # 200x the peers, but under the floor: fast jobs never trip it
    ([1.0] * 3, [9.0, 9.0, 9.0], False),  # over the floor, but under 10x the peers
    ([0.01] * 3, [6.0], False),  # one slow reply is not enough
    ([0.01] * 3, [6.0, 0.01, 6.0], True),  # two of the last replies
    ([], [600.0, 600.0, 600.0], False),  # no peer ran this op: no judgement
])
def test_the_slow_rule(peers, times, slow):
    pace = Pace()
    for t in peers:
        pace.judge(0, ("op", "forward"), t, [])
    verdicts = [pace.judge(1, ("op", "forward"), t, [0, 2]) for t in times]
    assert (verdicts[-1] is not None) is slow and all(v is None for v in verdicts[:-1])
    if slow:  # said once: the count starts over
        assert pace.judge(1, ("op", "forward"), 6.0, [0]) is None
