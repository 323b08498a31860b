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
import math
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
    # The contracted axis of the result is a free axis that comes from one operand only (u or v),
    # so that operand is contracted first, which is cheap. Which axis is a kind's choice (speed,
    # and the length of the axis, which enters the rounding tolerance).
    @abstractmethod
    def sketch(self, product: Product, u: Tensor, v: Tensor, r: Tensor, shapes: OpShapes) -> Tensor:
        """g(u, v) with one free axis contracted by the columns of r (shape [axis, t])."""

    def sketch_squares(self, product: Product, u: Tensor, v: Tensor, columns: int, shapes: OpShapes
                       ) -> Tensor:
        """Per sketch entry, the sum of its squared terms: ``sketch(u∘u, v∘v, 1)``.

        The terms of a sketch entry are ``r_a u_i v_j`` with ``r_a = ±1``, so their squares do not
        depend on r: one all-ones column is enough. The result broadcasts against sketch()'s
        output for `columns` columns (kinds may return it with a size-1 column axis). Kinds
        override this with cheaper reductions of the same quantity.
        """
        ones = u.new_ones(self.sketch_axis(product, shapes), columns)
        return self.sketch(product, u * u, v * v, ones, shapes)

    @abstractmethod
    def contract(self, product: Product, z: Tensor, r: Tensor, shapes: OpShapes) -> Tensor:
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


CHUNK_BYTES = 1 << 18  # slices this small stay in cache between squaring and summing


def sum_of_squares(t: Tensor, dim: int) -> Tensor:
    """``(t * t).sum(dim)`` in one pass over t: squared in cache-sized slices, no squared copy of t."""
    shape = t.shape
    dim = dim % t.dim()
    lead, d, trail = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
    out_shape = (*shape[:dim], *shape[dim + 1:])
    if trail == 1:  # a fused reduction along the last axis
        return torch.linalg.vector_norm(t.reshape(lead, d), dim=1).square_().reshape(out_shape)
    t3 = t.reshape(lead, d, trail)
    if lead > 1:
        step = max(1, CHUNK_BYTES // max(1, d * trail * t.element_size()))
        out = t.new_empty(lead, trail)
        for i in range(0, lead, step):
            c = t3[i:i + step]
            torch.sum(c * c, 1, out=out[i:i + step])
        return out.reshape(out_shape)
    step = max(1, CHUNK_BYTES // max(1, trail * t.element_size()))
    out = t.new_zeros(trail)
    for i in range(0, d, step):
        c = t3[0, i:i + step]
        out += (c * c).sum(0)
    return out.reshape(out_shape)
