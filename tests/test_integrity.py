"""t-integrity: every kind of lie is caught; honest products never raise."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tempo
from conftest import protect_quietly
from tempo.enclave.integrity import KAPPA, verify
from tempo.enclave.keys import KeyStream
from tempo.errors import IntegrityError
from tempo.products import BatchedMatmul, Conv2d, Linear, OpShapes, Product
from tempo.testing import Lie, lying_workers


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 8 * 8, 10))


@pytest.mark.parametrize("scheme", ["permute", "mix"])
@pytest.mark.parametrize("lie", list(Lie))
@pytest.mark.parametrize("honest_jobs", [0, 3, 5])  # lie in the forward, or in a backward job
def test_each_lie_is_caught(lie, honest_jobs, scheme):
    with lying_workers(1, lie, honest_jobs=honest_jobs) as pool:
        model = protect_quietly(small_cnn(), pool, checks=2, scheme=scheme)
        x = torch.randn(4, 3, 8, 8)
        with pytest.raises(IntegrityError) as caught:
            model(x).sum().backward()
        assert pool.cores[0].lies_told == 1  # stopped at the first lie: nothing wrong was used
    err = caught.value
    assert err.worker == "inproc-0" and err.step == 1 and err.op in {"0", "3", "6"}
    assert "integrity check failed" in str(err) and err.op in str(err)


def test_a_lie_never_reaches_the_model():
    model = nn.Linear(8, 4)
    before = model.weight.detach().clone()
    with lying_workers(1, Lie.SCALE, honest_jobs=1) as pool:  # forward honest, backward lies
        protected = protect_quietly(model, pool)
        out = protected(torch.randn(5, 8))
        with pytest.raises(IntegrityError):
            out.sum().backward()
    assert model.weight.grad is None and torch.equal(model.weight, before)


def _honest_products():
    """Operands shaped like real layers, with realistic statistics (ReLU inputs, fan-in init)."""
    rng = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=rng)

    for b, n, m in [(64, 512, 10), (4160, 192, 64), (64, 2304, 256), (1, 3, 1), (7, 1000, 33)]:
        yield Linear(), r(b, n).relu(), r(m, n) / math.sqrt(n)
    for g, b, n, m in [(12, 65, 16, 65), (24, 65, 65, 16), (3, 1, 5, 7)]:
        yield BatchedMatmul(), r(g, b, n), r(g, n, m)
    for n_, c, h, o, k, s, gr in [(64, 64, 14, 64, 3, 1, 1), (32, 128, 7, 256, 3, 2, 1), (4, 512, 1, 512, 3, 1, 1),
                                  (64, 1, 28, 64, 7, 2, 1), (8, 32, 9, 32, 3, 1, 32), (8, 32, 9, 64, 3, 2, 4)]:
        yield Conv2d(stride=s, padding=k // 2, groups=gr), r(n_, c, h, h).relu(), r(o, c // gr, k, k) / math.sqrt(
            c * k * k / gr)


def test_honest_products_never_raise():
    """1,000+ honest checks across layer shapes; also reports the margin below the tolerance."""
    rng = KeyStream(7)
    checked = 0
    for kind, x, w in _honest_products():
        y = kind.forward(x, w)
        dy = torch.randn_like(y)
        shapes = OpShapes(x.shape, w.shape, y.shape)
        products = [(Product.FORWARD, x, w, y), (Product.GRAD_INPUT, dy, w, kind.grad_input(dy, w, x.shape)),
                    (Product.GRAD_WEIGHT, x, dy, kind.grad_weight(x, dy, w.shape))]
        for product, u, v, z in products:
            for _ in range(25):
                assert verify(kind, product, u, v, z, shapes=shapes, checks=2, rng=rng) is None
                checked += 1
    assert checked >= 1000


def test_one_entry_off_by_1e3_relative_is_caught_across_shapes():
    """The detection claim of integrity.py: a 1e-3 relative change of the largest entry is caught."""
    rng = KeyStream(8)
    for kind, x, w in _honest_products():
        y = kind.forward(x, w)
        shapes = OpShapes(x.shape, w.shape, y.shape)
        bad = y.clone()
        bad.view(-1)[int(y.abs().argmax())] *= 1 + 1e-3
        n = kind.contraction_length(Product.FORWARD, shapes)
        if n > 1000:  # beyond ~1000 terms per entry, 1e-3 approaches float32 rounding (see docs)
            continue
        assert verify(kind, Product.FORWARD, x, w, bad, shapes=shapes, checks=2, rng=rng) is not None


def test_checks_zero_disables_verification_loudly():
    """Without checks the same lie goes through: the checks, not something else, catch it."""
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with lying_workers(1, Lie.SCALE) as pool, pytest.warns(UserWarning, match="checks=0"):
        protected = tempo.protect(layer, pool, checks=0, offload_anchors=True)
        out = protected(x)
    assert torch.allclose(out - layer.bias, 1.01 * (x @ layer.weight.T), rtol=1e-5)


def test_tolerance_leaves_margin():
    assert KAPPA >= 8  # the honest worst case measured by test_honest_products_never_raise is ~1.3


def test_tiny_gradients_do_not_trip_the_check():
    """dY ~ 1e-24 (a confidently classified sample): squares underflow unless rescaled."""
    rng = KeyStream(9)
    kind, w = Linear(), torch.randn(10, 64)
    for scale in (1e-24, 1e-30, 1e20):
        dy = torch.randn(32, 10) * scale
        dx = kind.grad_input(dy, w, (32, 64))
        shapes = OpShapes(torch.Size([32, 64]), w.shape, dy.shape)
        assert verify(kind, Product.GRAD_INPUT, dy, w, dx, shapes=shapes, checks=2, rng=rng) is None
        bad = dx.clone()
        bad[0, 0] *= 1.01
        assert verify(kind, Product.GRAD_INPUT, dy, w, bad, shapes=shapes, checks=2, rng=rng) is not None
