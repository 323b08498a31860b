"""``F.conv2d`` (what ``nn.Conv2d`` calls): any stride, padding, dilation and groups.

By default the worker runs a convolution, so spatial positions reach it in place (keys act on
channels and samples). With ``protect(..., unfold_convs=True)`` the enclave unfolds the input
(im2col) and offloads a batched product whose rows are every sample *and position*, each group a
batch entry: the row key then shuffles positions too, at k²/stride² times the bytes for X'. The
enclave folds the gradient back (autograd through ``F.unfold``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ...products import BatchedMatmul, Conv2d
from ..autograd import offload
from ..intercept import handles


def _same_padding(x: Tensor, weight: Tensor, dilation: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Resolve padding='same': symmetric where possible, else pad the input in the enclave."""
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
    if all(t % 2 == 0 for t in totals):
        return x, (totals[0] // 2, totals[1] // 2)
    (th, tw) = totals
    return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2)), (0, 0)


@handles(F.conv2d)
def conv2d(engine, input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> Tensor:
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        x, padding = _same_padding(x, weight, dilation)
    kind = Conv2d(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = _unfolded(engine, kind, x, weight) if engine.unfold_convs else offload(engine, kind, x, weight)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.squeeze(0) if unbatched else y


def _unfolded(engine, kind: Conv2d, x: Tensor, weight: Tensor) -> Tensor:
    """The convolution as a batched product over groups: [groups, samples x positions, patch] @ [groups, patch, out]."""
    batch, out_channels, groups = x.shape[0], weight.shape[0], kind.groups
    cols = F.unfold(x, weight.shape[2:], dilation=kind.dilation, padding=kind.padding, stride=kind.stride)
    positions = cols.shape[2]  # cols: [B, C k k, positions]
    rows = cols.view(batch, groups, -1, positions).permute(1, 0, 3, 2).reshape(groups, batch * positions, -1)
    w = weight.reshape(groups, out_channels // groups, -1).transpose(1, 2)  # [groups, patch, out per group]
    y = offload(engine, BatchedMatmul(), rows, w, name=engine.op_name("conv2d"))  # [groups, B L, out per group]
    y = y.view(groups, batch, positions, -1).permute(1, 0, 3, 2).reshape(batch, out_channels, positions)
    return y.view(kind.output_shape(x.shape, weight.shape))
