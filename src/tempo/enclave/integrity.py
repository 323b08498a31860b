"""t-integrity: Freivalds checks of every product a worker returns.

For a claimed product Z = g(U, V) the enclave draws R with t columns of independent ±1
entries and compares ``contract(Z, R)`` with ``sketch(U, V, R)``, which contracts the operand
that the sketched axis comes from first and so costs a fraction of the product. A wrong Z
passes one column with probability <= 1/2, all t with <= 2^-t.

Tolerance: honest float results differ from the sketch by rounding, in the product (n terms per
entry) and in both contractions (a terms, the sketched axis). Per compared entry we allow
``KAPPA * eps * (sqrt(n) + sqrt(a)) * sqrt(sum of squared terms)`` (a random-walk rounding model);
the sum of squared terms is itself one cheap sketch of (U∘U, V∘V) against a single all-ones
column (the squared terms do not depend on the ±1 signs), which kinds compute with fused
reductions (``ProductKind.sketch_squares``). A change of one result entry by more than that
tolerance is always caught.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..products import OpShapes, Product, ProductKind
from .keys import KeyStream

KAPPA = 16.0  # measured honest worst case ~2.2 over varied shapes (tests/test_integrity.py)


def _max_abs(t: Tensor) -> float:
    """max |t| (NaN if t holds one); aminmax is ~20x faster than the inf-norm on CPU."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi)) if not (lo.isnan() or hi.isnan()) else math.nan


def _root_sum_of_squares(kind: ProductKind, product: Product, u: Tensor, v: Tensor, checks: int,
                         shapes: OpShapes) -> Tensor:
    """sqrt of the per-entry sum of squared terms, scaled so the squares neither underflow nor overflow.

    Tiny gradients (a confidently classified sample gives dY ~ 1e-24) square below float32's range;
    without rescaling the tolerance would collapse to zero and honest results would be rejected.
    """
    limit = torch.finfo(u.dtype).max ** 0.25
    su, sv = _max_abs(u), _max_abs(v)
    if all(1 / limit < s < limit for s in (su, sv)) or su == 0 or sv == 0:
        return kind.sketch_squares(product, u, v, checks, shapes).sqrt()
    return kind.sketch_squares(product, u / su, v / sv, checks, shapes).sqrt() * (su * sv)


def verify(kind: ProductKind, product: Product, u: Tensor, v: Tensor, claim: Tensor, *, shapes: OpShapes,
           checks: int, rng: KeyStream) -> str | None:
    """Why `claim` is not g(u, v), or None if it passes every check."""
    if checks <= 0:
        return None
    axis = kind.sketch_axis(product, shapes)
    r = rng.signs((axis, checks)).to(u.dtype)
    with torch.no_grad():
        expected = kind.sketch(product, u, v, r, shapes)
        got = kind.contract(product, claim, r, shapes)
        root_squares = _root_sum_of_squares(kind, product, u, v, checks, shapes)  # broadcasts
        eps = torch.finfo(u.dtype).eps
        n = kind.contraction_length(product, shapes)
        tol = KAPPA * eps * (math.sqrt(n) + math.sqrt(axis)) * root_squares + torch.finfo(u.dtype).tiny
        err = (got - expected).abs_()
        bad = ~(err <= tol)  # NaN counts as bad
    if not bool(bad.any()):
        return None
    tol = tol.expand_as(err)
    worst = int(torch.nan_to_num((err / tol), nan=math.inf).argmax())
    return (f"{int(bad.sum())} of {bad.numel()} sketch entries off (worst: |diff| "
            f"{err.flatten()[worst]:.3g} > tolerance {tol.flatten()[worst]:.3g}; t={checks})")
