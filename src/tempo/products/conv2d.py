"""2-D convolution with any stride, padding, dilation and groups (depthwise included).

Channels carry the algebra: input channels are the contraction axis (per group), output
channels the output axis; spatial axes are not blinded by channel keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input, conv2d_weight

from .base import KeyShape, Layouts, OpShapes, Product, ProductKind, Role


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


class Conv2d(ProductKind):
    """``Y = conv2d(X, W)`` with X: [N, C_in, H, W], W: [C_out, C_in/groups, kh, kw]."""

    name = "conv2d"

    def __init__(
        self,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
    ):
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = int(groups)
        if self.groups < 1 or min(self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"invalid conv2d params {self.params()}")

    def params(self) -> dict[str, int | list[int]]:
        return {
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
        }

    def _conv_args(self, groups: int | None = None) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups if groups is None else groups)

    def layouts(self) -> Layouts:
        return Layouts(
            x=(Role.ROW, Role.INNER, None, None),
            w=(Role.OUT, Role.INNER_OF_OUT, None, None),
            y=(Role.ROW, Role.OUT, None, None),
        )

    def key_shape(self, x_shape: Sequence[int], w_shape: Sequence[int]) -> KeyShape:
        sizes = {Role.ROW: x_shape[0], Role.INNER: x_shape[1], Role.OUT: w_shape[0]}
        return KeyShape(sizes, groups=self.groups)

    def check_operands(self, x_shape: Sequence[int], w_shape: Sequence[int]) -> str | None:
        g = self.groups
        if len(x_shape) != 4 or len(w_shape) != 4:
            return f"conv2d needs 4-D X and W, got {list(x_shape)} and {list(w_shape)}"
        if x_shape[1] != w_shape[1] * g or w_shape[0] % g:
            return f"conv2d with groups={g}: X {list(x_shape)} does not fit W {list(w_shape)}"
        return None

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, None, **self._conv_args())

    def grad_input(self, dy: Tensor, w: Tensor, x_shape: Sequence[int]) -> Tensor:
        return conv2d_input(list(x_shape), w, dy, **self._conv_args())

    def grad_weight(self, x: Tensor, dy: Tensor, w_shape: Sequence[int]) -> Tensor:
        return conv2d_weight(x, list(w_shape), dy, **self._conv_args())

    # -- sketches: contract a channel axis within each group -----------------------------------
    def _per_group(self, t: Tensor, dim: int) -> Tensor:
        """View channel axis `dim` of t as [groups, channels per group]."""
        shape = list(t.shape)
        return t.reshape([*shape[:dim], self.groups, shape[dim] // self.groups, *shape[dim + 1:]])

    def sketch(self, product: Product, u: Tensor, v: Tensor, r: Tensor, shapes: OpShapes) -> Tensor:
        g, t = self.groups, r.shape[1]
        if product is Product.FORWARD:  # contract W's output channels
            w_r = torch.einsum("gockl,ot->gtckl", self._per_group(v, 0), r).flatten(0, 1)
            return F.conv2d(u, w_r, None, **self._conv_args())
        if product is Product.GRAD_INPUT:  # contract W's input channels
            w_r = torch.einsum("ockl,ct->otkl", v, r)
            x_shape = [shapes.x[0], g * t, *shapes.x[2:]]
            return conv2d_input(x_shape, w_r, u, **self._conv_args())
        dy_r = torch.einsum("ngohw,ot->ngthw", self._per_group(v, 1), r).flatten(1, 2)
        return conv2d_weight(u, [g * t, *shapes.w[1:]], dy_r, **self._conv_args())

    def contract(self, product: Product, z: Tensor, r: Tensor) -> Tensor:
        if product is Product.GRAD_WEIGHT:
            return torch.einsum("gockl,ot->gtckl", self._per_group(z, 0), r).flatten(0, 1)
        return torch.einsum("ngchw,ct->ngthw", self._per_group(z, 1), r).flatten(1, 2)

    def sketch_axis(self, product: Product, shapes: OpShapes) -> int:
        if product is Product.GRAD_INPUT:
            return shapes.w[1]
        return shapes.w[0] // self.groups

    def contraction_length(self, product: Product, shapes: OpShapes) -> int:
        kernel = shapes.w[2] * shapes.w[3]
        if product is Product.FORWARD:
            return shapes.w[1] * kernel
        if product is Product.GRAD_INPUT:
            return shapes.w[0] // self.groups * kernel
        return shapes.y[0] * shapes.y[2] * shapes.y[3]
