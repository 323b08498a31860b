"""Matrix products: ``linear`` (X·Wᵀ, torch's weight layout) and ``bmm`` (batched X·W)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import CHUNK_BYTES, KeyShape, Layouts, OpShapes, Product, ProductKind, Role


def _row_sq(t: Tensor) -> Tensor:
    """Sums of squares along the last axis (a fused reduction: no squared copy of t)."""
    return torch.linalg.vector_norm(t, dim=-1).square_()


def _squared_times(a: Tensor, s: Tensor, *, transpose: bool = False) -> Tensor:
    """``(a∘a) @ s`` (or ``(a∘a)ᵀ @ s``) for a: [rows, k] or [g, rows, k], without a squared copy of a.

    s is [k] (or [rows] when transposing) for 2-D a, [g, k] (or [g, rows]) for 3-D a. The squares
    are formed slice by slice along the leading axis, in one small reused buffer.
    """
    step = max(1, CHUNK_BYTES // max(1, a[0].numel() * a.element_size()))
    if a.dim() == 2:
        if transpose:
            out = a.new_zeros(a.shape[1])
            buf = a.new_empty(min(step, a.shape[0]), a.shape[1])
            for i in range(0, a.shape[0], step):
                ac = a[i:i + step]
                sq = torch.mul(ac, ac, out=buf[:ac.shape[0]])
                out.addmv_(sq.T, s[i:i + step])
            return out
        out = a.new_empty(a.shape[0])
        buf = a.new_empty(min(step, a.shape[0]), a.shape[1])
        for i in range(0, a.shape[0], step):
            ac = a[i:i + step]
            torch.mv(torch.mul(ac, ac, out=buf[:ac.shape[0]]), s, out=out[i:i + step])
        return out
    g, rows, k = a.shape
    out = a.new_empty(g, k if transpose else rows, 1)
    buf = a.new_empty(min(step, g), rows, k)
    for i in range(0, g, step):
        ac = a[i:i + step]
        sq = torch.mul(ac, ac, out=buf[:ac.shape[0]])
        torch.bmm(sq.transpose(1, 2) if transpose else sq, s[i:i + step].unsqueeze(2), out=out[i:i + step])
    return out.squeeze(2)


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

    def contract(self, product: Product, z: Tensor, r: Tensor, shapes: OpShapes) -> Tensor:
        return r.T @ z if product is Product.GRAD_WEIGHT else z @ r

    def sketch_squares(self, product: Product, u: Tensor, v: Tensor, columns: int, shapes: OpShapes
                       ) -> Tensor:
        # the operand whose axis is contracted is reduced first (sum of squares along it), so only
        # the other one is squared in full
        if product is Product.FORWARD:  # [rows, 1]
            return _squared_times(u, (v * v).sum(0)).unsqueeze(1)
        if product is Product.GRAD_INPUT:  # [rows, 1]
            return _squared_times(u, _row_sq(v)).unsqueeze(1)
        return _squared_times(u, _row_sq(v), transpose=True).unsqueeze(0)  # [1, n]

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

    def contract(self, product: Product, z: Tensor, r: Tensor, shapes: OpShapes) -> Tensor:
        return z @ r

    def sketch_squares(self, product: Product, u: Tensor, v: Tensor, columns: int, shapes: OpShapes
                       ) -> Tensor:
        if product is Product.FORWARD:  # [g, rows, 1]
            return _squared_times(u, _row_sq(v)).unsqueeze(2)
        if product is Product.GRAD_INPUT:  # [g, rows, 1]
            return _squared_times(u, _squared_times(v, v.new_ones(v.shape[:2]), transpose=True)).unsqueeze(2)
        return _squared_times(u, _row_sq(v), transpose=True).unsqueeze(2)  # [g, n, 1]

    def sketch_axis(self, product: Product, shapes: OpShapes) -> int:
        return shapes.x[2] if product is Product.GRAD_INPUT else shapes.w[2]

    def contraction_length(self, product: Product, shapes: OpShapes) -> int:
        return {Product.FORWARD: shapes.x[2], Product.GRAD_INPUT: shapes.w[2]}.get(product, shapes.x[1])
