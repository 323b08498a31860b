"""``F.conv2d`` (what ``nn.Conv2d`` calls): any stride, padding, dilation and groups."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ...products import Conv2d
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
    y = offload(engine, kind, x, weight)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.squeeze(0) if unbatched else y
