"""Row sharding: an op's rows spread over the workers, sent together, each shard under its own key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import Call, compare_with_plain, protect_quietly
from tempo.enclave.pools import InProcessPool
from tempo.testing import RecordingPool
from tempo.wire.messages import ForwardJob, Job, Reply


class LoggingPool(InProcessPool):
    """In-process workers that log which worker got each job and when replies were collected."""

    def __init__(self, n: int):
        super().__init__(n)
        self.events: list[tuple[str, int]] = []
        self.forward_rows: list[tuple[int, int]] = []  # (worker, rows of X') of every forward job

    def submit(self, index: int, job: Job) -> None:
        self.events.append(("submit", index))
        if isinstance(job, ForwardJob):
            self.forward_rows.append((index, job.x.shape[0]))
        super().submit(index, job)

    def collect(self, index: int, *, payload_bytes: int | None = None) -> Reply:
        self.events.append(("collect", index))
        return super().collect(index, payload_bytes=payload_bytes)


@pytest.mark.parametrize("scheme", ["none", "permute", "mix"])
def test_rows_are_split_across_workers_and_sent_before_any_reply_is_awaited(scheme):
    pool = LoggingPool(3)
    compare_with_plain(nn.Linear(6, 2), [torch.randn(7, 6, requires_grad=True)], pool, scheme=scheme)
    assert pool.forward_rows == [(0, 3), (1, 2), (2, 2)]
    forward, backward = pool.events[:6], pool.events[6:]
    expected = [("submit", 0), ("submit", 1), ("submit", 2), ("collect", 0), ("collect", 1), ("collect", 2)]
    assert forward == expected and backward == expected


def test_sharded_training_matches_unsharded_training():
    """The same 4 SGD steps of a small CNN on 1 worker (no split) and on 3 (every op in 3 shards)."""

    def run(workers: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(),
                              nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        net = protect_quietly(model, InProcessPool(workers), scheme="mix")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        data = torch.randn(4, 10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        labels = torch.randint(0, 5, (4, 10), generator=torch.Generator().manual_seed(2))
        for x, y in zip(data, labels, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for sharded, whole in zip(run(3), run(1), strict=True):
        torch.testing.assert_close(sharded, whole, rtol=1e-4, atol=1e-5)


def test_each_shard_has_its_own_key():
    pool = RecordingPool(InProcessPool(2))
    net = protect_quietly(nn.Linear(8, 2), pool, scheme="mix")
    net(torch.randn(6, 8))
    (x0, w0), (x1, w1) = [dict(pool.received[i:i + 2]).values() for i in (0, 2)]
    assert x0.shape == x1.shape == (3, 8) and w0.shape == w1.shape == (2, 8)
    assert not torch.allclose(w0, w1, atol=1e-3)  # the same weight, blinded under two keys


def test_fewer_rows_than_workers_uses_one_shard_per_row():
    pool = LoggingPool(3)
    compare_with_plain(nn.Linear(5, 1), [torch.randn(2, 5, requires_grad=True)], pool)
    assert pool.forward_rows == [(0, 1), (1, 1)]


def test_an_op_whose_weight_outweighs_its_rows_is_not_split():
    """Each shard costs a W' out and a dW' back: 3 rows of 8 values against 64 weights stay whole, and
    24 rows against 16 weights make (at most) one shard per 16 values."""
    pool = LoggingPool(3)
    compare_with_plain(nn.Linear(8, 8), [torch.randn(3, 8, requires_grad=True)], pool)
    compare_with_plain(nn.Linear(8, 2), [torch.randn(4, 8, requires_grad=True)], pool)
    assert [rows for _, rows in pool.forward_rows] == [3, 2, 2]


def test_batched_matmuls_are_not_split():
    pool = LoggingPool(2)
    a, b = torch.randn(4, 3, 5, requires_grad=True), torch.randn(4, 5, 2, requires_grad=True)
    protect_quietly(Call(torch.bmm), pool)(a, b).sum().backward()
    assert [rows for _, rows in pool.forward_rows] == [4]
