"""Matrix products: ``linear`` (X·Wᵀ, torch's weight layout) and ``bmm`` (batched X·W)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import KeyShape, Layouts, OpShapes, Product, ProductKind, Role


class Linear(ProductKind):
    """``Y = X Wᵀ`` with X: [rows, in], W: [out, in] (``F.linear`` without bias)."""

    name = "linear"

    def params(self) -> dict[str, int | list[int]]:
        return {}

    def layouts(self) -> Layouts:
        return Layouts(x=(Role.ROW, Role.INNER), w=(Role.OUT, Role.INNER), y=(Role.ROW, Role.OUT))

    def key_shape(self, x_shape: Sequence[int], w_shape: Sequence[int]) -> KeyShape:
        return KeyShape({Role.ROW: x_shape[0], Role.INNER: x_shape[1], Role.OUT: w_shape[0]})

    def check_operands(self, x_shape: Sequence[int], w_shape: Sequence[int]) -> str | None:
        if len(x_shape) != 2 or len(w_shape) != 2 or x_shape[1] != w_shape[1]:
            return f"linear needs X [rows, n] and W [m, n], got {list(x_shape)} and {list(w_shape)}"
        return None

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return x @ w.T

    def grad_input(self, dy: Tensor, w: Tensor, x_shape: Sequence[int]) -> Tensor:
        return dy @ w

    def grad_weight(self, x: Tensor, dy: Tensor, w_shape: Sequence[int]) -> Tensor:
        return dy.T @ x

    def sketch(self, product: Product, u: Tensor, v: Tensor, r: Tensor, shapes: OpShapes) -> Tensor:
        if product is Product.FORWARD:
            return u @ (v.T @ r)
        if product is Product.GRAD_INPUT:
            return u @ (v @ r)
        return (v @ r).T @ u

    def contract(self, product: Product, z: Tensor, r: Tensor) -> Tensor:
        return r.T @ z if product is Product.GRAD_WEIGHT else z @ r

    def sketch_axis(self, product: Product, shapes: OpShapes) -> int:
        return shapes.x[1] if product is Product.GRAD_INPUT else shapes.w[0]

    def contraction_length(self, product: Product, shapes: OpShapes) -> int:
        return {Product.FORWARD: shapes.x[1], Product.GRAD_INPUT: shapes.w[0]}.get(product, shapes.x[0])


class BatchedMatmul(ProductKind):
    """``Y = X W`` with X: [batch, rows, n], W: [batch, n, m] (activation x activation)."""

    name = "bmm"

    def params(self) -> dict[str, int | list[int]]:
        return {}

    def layouts(self) -> Layouts:
        return Layouts(
            x=(Role.BATCH, Role.ROW, Role.INNER),
            w=(Role.BATCH, Role.INNER, Role.OUT),
            y=(Role.BATCH, Role.ROW, Role.OUT),
        )

    def key_shape(self, x_shape: Sequence[int], w_shape: Sequence[int]) -> KeyShape:
        return KeyShape(
            {Role.BATCH: x_shape[0], Role.ROW: x_shape[1], Role.INNER: x_shape[2], Role.OUT: w_shape[2]}
        )

    def check_operands(self, x_shape: Sequence[int], w_shape: Sequence[int]) -> str | None:
        if len(x_shape) != 3 or len(w_shape) != 3 or x_shape[0] != w_shape[0] or x_shape[2] != w_shape[1]:
            return f"bmm needs X [g, b, n] and W [g, n, m], got {list(x_shape)} and {list(w_shape)}"
        return None

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return torch.bmm(x, w)

    def grad_input(self, dy: Tensor, w: Tensor, x_shape: Sequence[int]) -> Tensor:
        return torch.bmm(dy, w.transpose(1, 2))

    def grad_weight(self, x: Tensor, dy: Tensor, w_shape: Sequence[int]) -> Tensor:
        return torch.bmm(x.transpose(1, 2), dy)

    def sketch(self, product: Product, u: Tensor, v: Tensor, r: Tensor, shapes: OpShapes) -> Tensor:
        if product is Product.FORWARD:
            return u @ (v @ r)
        if product is Product.GRAD_INPUT:
            return u @ (v.transpose(1, 2) @ r)
        return u.transpose(1, 2) @ (v @ r)

    def contract(self, product: Product, z: Tensor, r: Tensor) -> Tensor:
        return z @ r

    def sketch_axis(self, product: Product, shapes: OpShapes) -> int:
        return shapes.x[2] if product is Product.GRAD_INPUT else shapes.w[2]

    def contraction_length(self, product: Product, shapes: OpShapes) -> int:
        return {Product.FORWARD: shapes.x[2], Product.GRAD_INPUT: shapes.w[2]}.get(product, shapes.x[1])
