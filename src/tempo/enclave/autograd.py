"""Autograd plumbing: an offloaded product as a node in PyTorch's graph."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..products import ProductKind
from .sharding import ShardedOp

if TYPE_CHECKING:
    from .engine import Engine


class _OffloadedProduct(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, w: Tensor, op: ShardedOp) -> Tensor:
        return op.forward(x, w)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, op = inputs
        ctx.op = op
        ctx.save_for_backward(x, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        dx, dw = ctx.op.backward(dy, x, w, need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        return dx, dw, None


def offload(engine: Engine, kind: ProductKind, x: Tensor, w: Tensor, *, name: str | None = None) -> Tensor:
    """``kind.forward(x, w)`` computed by workers on blinded operands, differentiable in x and w.

    X's rows are split across the live workers (:mod:`tempo.enclave.sharding`). Under no_grad (or
    when neither operand needs a gradient) the workers keep nothing.
    An anchor (the model's first or last product, see :mod:`tempo.enclave.anchors`) is computed
    here instead.
    """
    name = name or engine.op_name(kind.name)
    if engine.anchors.keeps(name):
        return kind.forward(x, w)
    problem = kind.check_operands(x.shape, w.shape)
    if problem:
        raise ValueError(f"op '{name}': {problem}")
    op = ShardedOp(engine, kind, name, engine.shards(kind, x, w))
    if not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        return op.forward(x, w)  # nothing kept on the workers
    op.keep_x, op.keep_w = w.requires_grad, x.requires_grad  # dW' needs X'; dX' needs W'
    return _OffloadedProduct.apply(x, w, op)
