"""Row sharding: one invocation of an op split by rows across the live workers (:meth:`Engine.shards`).

The rows of X (samples, or samples x tokens) are independent, so Y = X W splits into row
blocks Y_i = X_i W computed on different workers, each shard an :class:`OffloadedOp` with its
own fresh key (W' is sent, blinded differently, to every worker). In the backward dX joins the
shards' dX_i and dW = sum_i X_i^T dY_i is summed here, in the enclave, from unblinded partials.
All shards of a forward (or a backward) go out in one round (:func:`run_round`), so workers
compute side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..products import ProductKind
from .protocol import OffloadedOp, run_round

if TYPE_CHECKING:
    from .engine import Engine


class ShardedOp:
    """One invocation of an op as `shards` row shards (1: not split)."""

    def __init__(self, engine: Engine, kind: ProductKind, name: str, shards: int):
        self.shards = [OffloadedOp(engine, kind, name) for _ in range(shards)]
        self.keep_x = self.keep_w = False
        self._sizes: list[int] = []

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        parts = x.tensor_split(len(self.shards))
        self._sizes = [p.shape[0] for p in parts]
        ys = run_round([op.forward_stage(part, w, keep_x=self.keep_x, keep_w=self.keep_w)
                        for op, part in zip(self.shards, parts, strict=True)])
        return ys[0] if len(ys) == 1 else torch.cat(ys)

    def backward(self, dy: Tensor, x: Tensor, w: Tensor, *, need_dx: bool, need_dw: bool
                 ) -> tuple[Tensor | None, Tensor | None]:
        grads = run_round([op.backward_stage(dy_i, x_i, w, need_dx=need_dx, need_dw=need_dw)
                           for op, dy_i, x_i in zip(self.shards, dy.split(self._sizes), x.split(self._sizes),
                                                    strict=True)])
        dxs, dws = zip(*grads, strict=True)
        dx = None if not need_dx else dxs[0] if len(dxs) == 1 else torch.cat(dxs)
        dw = None if not need_dw else dws[0] if len(dws) == 1 else torch.stack(dws).sum(0)
        return dx, dw
