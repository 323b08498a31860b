"""2-D convolution with any stride, padding, dilation and groups (depthwise included).

Channels carry the algebra: input channels are the contraction axis (per group), output
channels the output axis; spatial axes are not blinded by channel keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input, conv2d_weight

from .base import KeyShape, Layouts, OpShapes, Product, ProductKind, Role, sum_of_squares


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
        return self._conv_input(x_shape, w, dy)

    def _conv_input(self, x_shape: Sequence[int], w: Tensor, dy: Tensor) -> Tensor:
        """conv2d's gradient with respect to an input of shape x_shape, as a transposed convolution.

        Same result as ``torch.nn.grad.conv2d_input``, which passes convolution_backward an
        expanded dummy input that some backends copy to full size first.
        """
        extra = [x_shape[2 + i] - ((dy.shape[2 + i] - 1) * self.stride[i] - 2 * self.padding[i]
                                   + self.dilation[i] * (w.shape[2 + i] - 1) + 1) for i in range(2)]
        if min(extra) < 0 or any(e >= max(s, d) for e, s, d in zip(extra, self.stride, self.dilation, strict=True)):
            return conv2d_input(list(x_shape), w, dy, **self._conv_args())
        return F.conv_transpose2d(dy, w, None, self.stride, self.padding, extra, self.groups, self.dilation)

    def grad_weight(self, x: Tensor, dy: Tensor, w_shape: Sequence[int]) -> Tensor:
        return conv2d_weight(x, list(w_shape), dy, **self._conv_args())

    # -- sketches ------------------------------------------------------------------------------
    # The contracted axis is chosen per call from the shapes, to touch the larger operand as few
    # times as possible (on CPU these checks are bound by memory traffic and by small-channel
    # kernels far below peak):
    # * forward / grad_input, activation-heavy (X resp. dY at least as large as W): contract the
    #   batch axis, from u. r^T u is a t-image batch and the sketch is the same convolution on t
    #   images with every channel (fast kernels; W is read a few times, u once or twice).
    # * forward / grad_input, weight-heavy (W larger): contract W's output (forward) or input
    #   (grad_input) channels within each group, from W. W is read twice: once to contract it
    #   and once, in cache-sized slices, for its sum of squares.
    # * grad_weight has no batch axis: it contracts dW's input channels (from X) or, when groups
    #   have few input channels, its output channels (from dY); W is not read at all.
    GW_MIN_INPUT_CHANNELS = 16  # measured: below this, t-input-channel weight gradients are slow

    def _gw_on_inputs(self, w_shape: Sequence[int]) -> bool:
        return w_shape[1] >= self.GW_MIN_INPUT_CHANNELS or w_shape[1] >= w_shape[0] // self.groups

    def _on_channels(self, product: Product, shapes: OpShapes) -> bool:
        """forward / grad_input: contract the channels of the result (else its batch axis)?"""
        w_size = math.prod(shapes.w)
        return w_size > math.prod(shapes.x if product is Product.FORWARD else shapes.y)

    @staticmethod
    def _batch_contract(t: Tensor, r: Tensor) -> Tensor:
        """r^T t over axis 0: [axis, ...] -> [cols, ...] (one matrix product, no copy of t)."""
        return (r.T @ t.reshape(t.shape[0], -1)).reshape(r.shape[1], *t.shape[1:])

    def _channel_contract(self, t: Tensor, r: Tensor) -> Tensor:
        """Channels of an [N, C, H, W] tensor contracted per group: -> [N, groups * cols, H, W]."""
        n, c, h, w = t.shape
        g, cols = self.groups, r.shape[1]
        return (r.T @ t.reshape(n, g, c // g, h * w)).reshape(n, g * cols, h, w)

    def _group_sum_sq(self, t: Tensor) -> Tensor:
        """Squares of an [N, C, H, W] tensor summed over the channels of each group: [N, groups, H, W]."""
        n, c, h, w = t.shape
        return sum_of_squares(t.reshape(n, self.groups, c // self.groups, h * w), 2).reshape(n, self.groups, h, w)

    def _per_group_columns(self, sq: Tensor, columns: int, dim: int) -> Tensor:
        """Squares with one entry per group along `dim`, repeated for each of `columns` columns."""
        if self.groups == 1:
            return sq  # a size-1 axis broadcasts
        shape = list(sq.shape)
        sq = sq.unsqueeze(dim + 1).expand(*shape[:dim + 1], columns, *shape[dim + 1:])
        return sq.reshape(*shape[:dim], shape[dim] * columns, *shape[dim + 1:])

    def sketch(self, product: Product, u: Tensor, v: Tensor, r: Tensor, shapes: OpShapes) -> Tensor:
        args = self._conv_args()
        g, t = self.groups, r.shape[1]
        if product is Product.FORWARD:
            if self._on_channels(product, shapes):  # conv(X, W contracted over its output channels)
                w_r = (r.T @ v.reshape(g, v.shape[0] // g, -1)).reshape(g * t, *v.shape[1:])
                return F.conv2d(u, w_r, None, **args)  # [N, g*t, H', W']
            return F.conv2d(self._batch_contract(u, r), v, None, **args)  # [t, O, H', W']
        if product is Product.GRAD_INPUT:
            if self._on_channels(product, shapes):  # W contracted over its input channels
                o, cpg, kh, kw = v.shape
                w_r = (r.T @ v.reshape(o, cpg, kh * kw)).reshape(o, t, kh, kw)
                return self._conv_input([shapes.x[0], g * t, *shapes.x[2:]], w_r, u)  # [N, g*t, H, W]
            return self._conv_input([t, *shapes.x[1:]], v, self._batch_contract(u, r))  # [t, C, H, W]
        if self._gw_on_inputs(shapes.w):  # dW contracted over its input channels: [O, t, kh, kw]
            return conv2d_weight(self._channel_contract(u, r), [shapes.w[0], t, *shapes.w[2:]], v, **args)
        # over its output channels, per group: [g * t, C/g, kh, kw]
        return conv2d_weight(u, [g * t, *shapes.w[1:]], self._channel_contract(v, r), **args)

    def contract(self, product: Product, z: Tensor, r: Tensor, shapes: OpShapes) -> Tensor:
        if product is not Product.GRAD_WEIGHT:
            return self._channel_contract(z, r) if self._on_channels(product, shapes) else self._batch_contract(z, r)
        o, cpg, kh, kw = z.shape
        g, t = self.groups, r.shape[1]
        if self._gw_on_inputs(z.shape):
            return (r.T @ z.reshape(o, cpg, kh * kw)).reshape(o, t, kh, kw)
        return (r.T @ z.reshape(g, o // g, -1)).reshape(g * t, cpg, kh, kw)

    def sketch_squares(self, product: Product, u: Tensor, v: Tensor, columns: int, shapes: OpShapes
                       ) -> Tensor:
        args = self._conv_args()
        g = self.groups
        if product is Product.FORWARD:
            if self._on_channels(product, shapes):  # [N, g (x columns), H', W']
                w2 = sum_of_squares(v.reshape(g, v.shape[0] // g, -1), 1).reshape(g, *v.shape[1:])
                return self._per_group_columns(F.conv2d(u * u, w2, None, **args), columns, 1)
            # [1, O, H', W']: sum_n X[n]^2 convolved with W^2
            return F.conv2d(sum_of_squares(u, 0).unsqueeze(0), v * v, None, **args)
        if product is Product.GRAD_INPUT:
            if self._on_channels(product, shapes):  # [N, g (x columns), H, W]
                o, cpg, kh, kw = v.shape
                w2 = sum_of_squares(v.reshape(o, cpg, kh * kw), 1).reshape(o, 1, kh, kw)
                sq = self._conv_input([shapes.x[0], g, *shapes.x[2:]], w2, u * u)
                return self._per_group_columns(sq, columns, 1)
            return self._conv_input([1, *shapes.x[1:]], v * v, sum_of_squares(u, 0).unsqueeze(0))  # [1, C, H, W]
        if self._gw_on_inputs(shapes.w):  # [O, 1, kh, kw]
            return conv2d_weight(self._group_sum_sq(u), [shapes.w[0], 1, *shapes.w[2:]], v * v, **args)
        sq = conv2d_weight(u * u, [g, *shapes.w[1:]], self._group_sum_sq(v), **args)  # [g, C/g, kh, kw]
        return self._per_group_columns(sq, columns, 0)

    def sketch_axis(self, product: Product, shapes: OpShapes) -> int:
        if product is Product.FORWARD:
            return shapes.w[0] // self.groups if self._on_channels(product, shapes) else shapes.x[0]
        if product is Product.GRAD_INPUT:
            return shapes.w[1] if self._on_channels(product, shapes) else shapes.x[0]
        return shapes.w[1] if self._gw_on_inputs(shapes.w) else shapes.w[0] // self.groups

    def contraction_length(self, product: Product, shapes: OpShapes) -> int:
        kernel = shapes.w[2] * shapes.w[3]
        if product is Product.FORWARD:
            return shapes.w[1] * kernel
        if product is Product.GRAD_INPUT:
            return shapes.w[0] // self.groups * kernel
        return shapes.y[0] * shapes.y[2] * shapes.y[3]
