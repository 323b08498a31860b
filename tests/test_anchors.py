"""Anchors: the first and last products stay in the enclave by default, learned from the first forward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import tempo
from tempo.enclave.pools import InProcessPool
from tempo.testing.recording import RecordingPool
from tolerance import assert_as_exact_as_float32


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def _protect(model: nn.Module, pool, **kwargs) -> tempo.ProtectedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tempo.protect(model, pool, key_seed=3, **kwargs)


def test_first_and_last_products_stay_inside_by_default() -> None:
    model, pool = _net(), RecordingPool(InProcessPool(1))
    plain = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = tempo.protect(model, pool, key_seed=3)
        x = torch.randn(2, 1, 8, 8)
        net(x).sum().backward()  # the first forward runs wholly inside: it learns the anchors
    assert pool.jobs == []
    assert net.engine.anchors.names == ("0", "5")
    assert any("('0', '5') run inside the enclave" in str(w.message) for w in caught)
    exact = copy.deepcopy(plain).double()  # float32 is judged against float64 (tests/tolerance.py)
    for _ in range(2):
        for m in (model, plain, exact):
            m.zero_grad()
        assert_as_exact_as_float32(net(x), plain(x), exact(x.double()), "output")
        net(x).sum().backward()
        plain(x).sum().backward()
        exact(x.double()).sum().backward()
        for (name, a), b, c in zip(model.named_parameters(), plain.parameters(), exact.parameters(), strict=True):
            assert_as_exact_as_float32(a.grad, b.grad, c.grad, f"grad of {name}")
    assert set(pool.jobs) == {"ForwardJob", "BackwardJob"}
    assert pool.jobs.count("ForwardJob") == 4  # only the middle convolution, twice per iteration


def test_anchors_can_be_offloaded() -> None:
    pool = RecordingPool(InProcessPool(1))
    net = _protect(_net(), pool, offload_anchors=True)
    net(torch.randn(2, 1, 8, 8))
    assert pool.jobs.count("ForwardJob") == 3 and net.engine.anchors.names is None


def test_a_failed_first_forward_teaches_nothing() -> None:
    net = _protect(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), InProcessPool(1))
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 5))
    assert net.engine.anchors.names is None
    net(torch.randn(2, 4))
    assert net.engine.anchors.names == ("0", "1")
