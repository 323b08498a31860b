"""``none``: operands are sent in plaintext. The insecure reference, for comparison only."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..products import KeyShape, Layout
from .base import Operand, RandomSource, Scheme


class NoBlinding(Scheme):
    name = "none"
    secure = False
    summary = "INSECURE reference: workers see plaintext weights, activations and gradients"
    updates_commute = True

    def new_key(self, shape: KeyShape, rng: RandomSource) -> Any:
        return None

    def with_fresh_rows(self, key: Any, shape: KeyShape, rng: RandomSource) -> Any:
        return None

    def blind(self, t: Tensor, layout: Layout, operand: Operand, key: Any) -> Tensor:
        return t.detach().clone()

    def key_tensors(self, key: Any) -> dict[str, Tensor]:
        return {}

    def unblind(self, t: Tensor, layout: Layout, operand: Operand, key: Any) -> Tensor:
        return t
