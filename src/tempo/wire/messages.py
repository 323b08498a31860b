"""The closed set of messages between the enclave and a worker.

Only blinded tensors and public op parameters ever appear here. A worker keeps the blinded
operands of a forward job under its ``handle`` until the matching backward job (or a release)
so that the backward pass needs only the blinded output gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class ForwardJob:
    job_id: int
    handle: int
    kind: str
    params: dict
    x: Tensor
    w: Tensor
    keep_x: bool  # the backward will need X' (for dW')
    keep_w: bool  # the backward will need W' (for dX')
    release: tuple[int, ...] = ()  # handles whose backward will never come


@dataclass(frozen=True)
class BackwardJob:
    job_id: int
    handle: int
    dy: Tensor
    need_dx: bool
    need_dw: bool
    release: tuple[int, ...] = ()


@dataclass(frozen=True)
class Result:
    job_id: int
    tensors: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    job_id: int
    message: str


@dataclass(frozen=True)
class Shutdown:
    pass


Job = ForwardJob | BackwardJob
Reply = Result | Failure
Message = ForwardJob | BackwardJob | Result | Failure | Shutdown
