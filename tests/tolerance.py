"""Float32 results judged against a float64 reference, by plain float32's own error (docs/correctness.md).

A float32 run can differ from another float32 run by far more than float32's epsilon: which kernels the CPU
picks decides the summation order, and a model may amplify that rounding. A fixed tolerance between Tempo and
plain PyTorch in float32 therefore measures the CPU. Instead, both float32 results are measured against the
same computation in float64: Tempo may be off from it by a small multiple of what plain float32 is off by
(the largest such error over one or more equally valid plain float32 runs), plus a few units of float32
rounding of the quantity's scale (for a value plain float32 happens to get almost exactly right).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

EPS32 = torch.finfo(torch.float32).eps
FACTOR = 4.0  # Tempo's error may be this many times plain float32's ...
ULPS = 16  # ... plus this many float32 epsilons of the reference's largest magnitude


def float32_bound(plain: Sequence[Tensor], reference: Tensor, *, factor: float = FACTOR, ulps: float = ULPS) -> float:
    """The largest max-abs error to `reference` that a float32 result as good as `plain` may have."""
    reference = reference.double()
    noise = max(_error(p, reference) for p in plain)
    return factor * noise + ulps * EPS32 * reference.abs().max().item()


def assert_as_exact_as_float32(actual: Tensor, plain: Tensor | Sequence[Tensor], reference: Tensor,
                               what: str, **bound) -> None:
    """`actual` (float32) is within `float32_bound` of `reference` (the same computation in float64).

    `plain`: plain PyTorch's float32 results for the same inputs, one or several kernel paths.
    """
    plain = [plain] if isinstance(plain, Tensor) else list(plain)
    reference = reference.double()
    err, limit = _error(actual, reference), float32_bound(plain, reference, **bound)
    assert err <= limit, (f"{what}: max abs error {err:.3g} to float64 > bound {limit:.3g} "
                          f"(plain float32's error {max(_error(p, reference) for p in plain):.3g}, "
                          f"scale {reference.abs().max().item():.3g})")


def _error(t: Tensor, reference: Tensor) -> float:
    if t.shape != reference.shape:
        raise ValueError(f"shape {tuple(t.shape)} compared with a reference of shape {tuple(reference.shape)}")
    return (t.double() - reference).abs().max().item() if t.numel() else 0.0
