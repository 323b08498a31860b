"""The bilinear products Tempo offloads, as pure maths shared by both sides.

Every offloaded op is a bilinear map ``Y = f(X, W)`` with three products per training step:

* forward      ``Y  = f(X, W)``
* grad_input   ``dX = f_X^T(dY, W)``
* grad_weight  ``dW = f_W^T(X, dY)``

A :class:`ProductKind` implements the three kernels (the worker runs them on blinded operands)
and, for integrity checks, a *sketch* of each: the product with one free axis of the result
contracted by a few vectors ``R``, computed at a fraction of the product's cost, together with
the matching contraction of a claimed result. The enclave compares the two (Freivalds).

It also names the role each tensor axis plays (:class:`Role`), which is all a blinding scheme
needs to know about an op. Nothing here is secret; both sides import it.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class Product(str, enum.Enum):
    FORWARD = "forward"
    GRAD_INPUT = "grad_input"
    GRAD_WEIGHT = "grad_weight"


class Role(str, enum.Enum):
    """What an axis means for the algebra of a product, and so how a key may transform it."""

    BATCH = "batch"  # independent products stacked (bmm); shared by both operands
    ROW = "row"  # rows of X and Y: batch, or batch x positions
    INNER = "inner"  # the contraction axis shared by X and W
    OUT = "out"  # output features: columns of W and Y
    INNER_OF_OUT = "inner_of_out"  # W's inner axis when it is indexed per output group (grouped conv)


Layout = tuple[Role | None, ...]  # one entry per tensor dim; None: the axis is not blinded


@dataclass(frozen=True)
class Layouts:
    x: Layout
    w: Layout
    y: Layout


@dataclass(frozen=True)
class KeyShape:
    """The sizes a key must cover for one op invocation."""

    sizes: dict[Role, int]
    groups: int = 1


class ProductKind(ABC):
    """One family of bilinear ops: kernels, sketches, axis roles. Instances hold the op's params."""

    name: str

    @abstractmethod
    def params(self) -> dict[str, int | list[int]]:
        """Public op parameters, as sent on the wire."""

    @abstractmethod
    def layouts(self) -> Layouts: ...

    @abstractmethod
    def key_shape(self, x_shape: Sequence[int], w_shape: Sequence[int]) -> KeyShape: ...

    @abstractmethod
    def check_operands(self, x_shape: Sequence[int], w_shape: Sequence[int]) -> str | None:
        """Why these operand shapes are invalid for this op, or None."""

    # -- kernels -------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, x: Tensor, w: Tensor) -> Tensor: ...

    @abstractmethod
    def grad_input(self, dy: Tensor, w: Tensor, x_shape: Sequence[int]) -> Tensor: ...

    @abstractmethod
    def grad_weight(self, x: Tensor, dy: Tensor, w_shape: Sequence[int]) -> Tensor: ...

    def output_shape(self, x_shape: Sequence[int], w_shape: Sequence[int]) -> torch.Size:
        x = torch.empty(x_shape, device="meta")
        w = torch.empty(w_shape, device="meta")
        return self.forward(x, w).shape

    # -- Freivalds sketches ----------------------------------------------------------------------
    # For product p = g(u, v): (u, v) = (x, w) forward, (dy, w) grad_input, (x, dy) grad_weight.
    # The contracted axis of the result always comes from v, so contracting v first is cheap.
    @abstractmethod
    def sketch(self, product: Product, u: Tensor, v: Tensor, r: Tensor, shapes: OpShapes) -> Tensor:
        """g(u, v) with its v-derived axis contracted by the columns of r (shape [axis, t])."""

    @abstractmethod
    def contract(self, product: Product, z: Tensor, r: Tensor) -> Tensor:
        """The claimed result z with the same axis contracted by r; same shape as sketch()."""

    @abstractmethod
    def sketch_axis(self, product: Product, shapes: OpShapes) -> int:
        """Length of the axis that sketch() and contract() contract."""

    @abstractmethod
    def contraction_length(self, product: Product, shapes: OpShapes) -> int:
        """Number of terms summed per result entry (sets the float rounding tolerance)."""


@dataclass(frozen=True)
class OpShapes:
    x: torch.Size
    w: torch.Size
    y: torch.Size
