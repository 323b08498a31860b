"""``F.linear``: rows are every leading axis of the input; the bias stays in the enclave."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from ...products import Linear
from ..autograd import offload
from ..intercept import handles


@handles(F.linear)
def linear(engine, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    lead = input.shape[:-1]
    y = offload(engine, Linear(), input.reshape(-1, input.shape[-1]), weight)
    y = y.reshape(*lead, weight.shape[0])
    return y if bias is None else y + bias
