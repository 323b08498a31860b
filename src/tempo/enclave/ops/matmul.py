"""Matrix products between activations (and weights used functionally).

``torch.matmul`` semantics: 1-D operands are promoted, batch axes broadcast. A 2-D right operand
is a weight-like product (rows = every leading axis); otherwise it is a batched product whose
batch axis is blinded on both operands with one key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...products import BatchedMatmul, Linear
from ..autograd import offload
from ..intercept import handles


def offload_matmul(engine, a: Tensor, b: Tensor) -> Tensor:
    if a.dim() == 0 or b.dim() == 0:
        return a * b
    if a.dim() == 1:
        return offload_matmul(engine, a.unsqueeze(0), b).squeeze(-2)
    if b.dim() == 1:
        return offload_matmul(engine, a, b.unsqueeze(-1)).squeeze(-1)
    if b.dim() == 2:
        y = offload(engine, Linear(), a.reshape(-1, a.shape[-1]), b.T)
        return y.reshape(*a.shape[:-1], b.shape[-1])
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    y = offload(engine, BatchedMatmul(), a3, b3)
    return y.reshape(*batch, a.shape[-2], b.shape[-1])


@handles(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
         torch.bmm, torch.Tensor.bmm)
def matmul(engine, input: Tensor, other: Tensor, *, out: Tensor | None = None) -> Tensor:
    if out is not None:
        raise TypeError("Tempo does not support matmul(..., out=)")
    return offload_matmul(engine, input, other)


@handles(torch.Tensor.__rmatmul__)
def rmatmul(engine, self: Tensor, other: Tensor) -> Tensor:
    return offload_matmul(engine, other, self)


@handles(torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm)
def add_matmul(engine, input: Tensor, m1: Tensor, m2: Tensor, *, beta=1, alpha=1) -> Tensor:
    product = offload_matmul(engine, m1, m2)
    product = product if alpha == 1 else alpha * product
    return product + (input if beta == 1 else beta * input) if beta != 0 else product
