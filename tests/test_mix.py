"""Scheme `mix`: its keys are invertible, dense and consistent in every variant; and what they cannot hide."""

from __future__ import annotations

import warnings

import pytest
import torch

from tempo.enclave.keys import KeyStream
from tempo.products import Linear
from tempo.schemes import Mix, Operand
from tempo.schemes.mix import AxisMix


@pytest.fixture
def rng() -> KeyStream:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded key stream
        return KeyStream(21)


@pytest.mark.parametrize(("n", "groups"), [(1, 1), (7, 1), (64, 1), (100, 1), (12, 3), (96, 4)])
def test_every_variant_is_the_matrix_it_claims(rng, n, groups):
    key = AxisMix(n, groups, rng.permutation(groups), rng)
    m, eye = key.dense(), torch.eye(n, dtype=torch.float64)
    apply = lambda inverse, transpose: key.apply(eye, 1, inverse=inverse, transpose=transpose)  # noqa: E731
    torch.testing.assert_close(apply(True, False), torch.linalg.inv(m))
    torch.testing.assert_close(apply(False, True), m.T)
    torch.testing.assert_close(apply(True, True), torch.linalg.inv(m).T)
    assert torch.linalg.cond(m) <= 2.0 ** 4 + 1e-9  # SPREAD ** (2 ROUNDS)
    if groups > 1:  # block diagonal per group, groups moved whole
        per = n // groups
        blocks = (m.abs() > 1e-12).reshape(groups, per, groups, per).any(dim=(1, 3))
        assert torch.equal(blocks.sum(0), torch.ones(groups, dtype=torch.long))


def test_a_key_mixes_every_feature_with_every_other(rng):
    m = AxisMix(64, 1, torch.zeros(1, dtype=torch.long), rng).dense()
    assert bool((m.abs() > 1e-12).all())
    assert not torch.allclose(m.T @ m, torch.eye(64, dtype=torch.float64), atol=0.1)  # not orthogonal


def test_a_worker_can_compute_key_invariant_spectra(rng):
    """A known weakness, pinned: Y' = A Y N and dY' = A dY N⁻ᵀ make Y'ᵀ dY' = Nᵀ (Yᵀ dY) N⁻ᵀ, a similarity
    transform, so the worker learns the spectrum of Yᵀ dY (and a basis in which N cancels) under any key.
    A scheme that fixes this makes this test fail: then turn it around."""
    scheme, kind = Mix(), Linear()
    x, w = torch.randn(256, 24, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64)
    y, dy = kind.forward(x, w), torch.randn(256, 16, dtype=torch.float64)
    key = scheme.new_key(kind.key_shape(x.shape, w.shape), rng)
    layouts = kind.layouts()
    y_b = kind.forward(scheme.blind(x, layouts.x, Operand.X, key), scheme.blind(w, layouts.w, Operand.W, key))
    dy_b = scheme.blind(dy, layouts.y, Operand.DY, key)

    def spectrum(a):
        return torch.sort(torch.linalg.eigvals(a).real).values

    torch.testing.assert_close(spectrum(y_b.T @ dy_b), spectrum(y.T @ dy), rtol=1e-6, atol=1e-8)
    assert not torch.allclose(y_b.T @ dy_b, y.T @ dy)  # the matrix itself is hidden; its spectrum is not
