"""t-integrity: Freivalds checks of every product a worker returns.

For a claimed product Z = g(U, V) the enclave draws R with t columns of independent ±1 entries
and compares ``contract(Z, R)`` with ``sketch(U, V, R)``, which contracts V first and so costs a
fraction of the product. A wrong Z passes one column with probability <= 1/2, all t with <= 2^-t.

Tolerance: honest float results differ from the sketch by rounding, in the product (n terms per
entry) and in both contractions (a terms, the sketched axis). Per compared entry we allow
``KAPPA * eps * (sqrt(n) + sqrt(a)) * sqrt(sum of squared terms)`` (a random-walk rounding model);
the sum of squared terms is itself one cheap sketch of (U∘U, V∘V) against ones. A change
of one result entry by more than that tolerance is always caught.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..products import OpShapes, Product, ProductKind
from .keys import KeyStream

KAPPA = 16.0  # measured honest worst case ~1.3 over varied shapes (tests/test_integrity.py)


def verify(kind: ProductKind, product: Product, u: Tensor, v: Tensor, claim: Tensor, *, shapes: OpShapes,
           checks: int, rng: KeyStream) -> str | None:
    """Why `claim` is not g(u, v), or None if it passes every check."""
    if checks <= 0:
        return None
    axis = kind.sketch_axis(product, shapes)
    r = rng.signs((axis, checks)).to(u.dtype)
    with torch.no_grad():
        expected = kind.sketch(product, u, v, r, shapes)
        got = kind.contract(product, claim, r)
        squares = kind.sketch(product, u * u, v * v, torch.ones_like(r), shapes)
    eps = torch.finfo(u.dtype).eps
    n = kind.contraction_length(product, shapes)
    tol = KAPPA * eps * (math.sqrt(n) + math.sqrt(axis)) * squares.sqrt() + torch.finfo(u.dtype).tiny
    err = (got - expected).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    if not bool(bad.any()):
        return None
    worst = int(torch.nan_to_num((err / tol), nan=math.inf).argmax())
    return (f"{int(bad.sum())} of {bad.numel()} sketch entries off (worst: |diff| "
            f"{err.flatten()[worst]:.3g} > tolerance {tol.flatten()[worst]:.3g}; t={checks})")
