"""The closed set of messages between the enclave and a worker.

Only blinded tensors and public op parameters ever appear here. A worker keeps the blinded
operands of a forward job under its ``handle`` until the matching backward job (or a release)
so that the backward pass needs only the blinded output gradient.

With a key lifetime K > 1 (``protect(key_lifetime=K)``) a weight's W' is *resident*: installed
once per key (:class:`Install`), named by ``weight`` in forward jobs that then carry no ``w``,
and updated in blinded form by the worker after each optimizer step (:class:`Update`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

PROTOCOL_VERSION = 3  # 3: queued join requests, signed answers, the link proved both ways (wire.dist)

# Optimizers a worker can repeat on resident weights (torch.optim class names): element-wise ones,
# whose update of a permuted weight is the permuted update.
UPDATABLE_OPTIMIZERS = ("SGD", "Adam", "AdamW")


@dataclass(frozen=True)
class ForwardJob:
    job_id: int
    handle: int
    kind: str
    params: dict
    x: Tensor
    w: Tensor | None  # None: use the resident weight `weight`
    keep_x: bool  # the backward will need X' (for dW')
    keep_w: bool  # the backward will need W' (for dX')
    release: tuple[int, ...] = ()  # handles whose backward will never come
    weight: int = 0  # resident weight id (with w None); 0: none


@dataclass(frozen=True)
class BackwardJob:
    job_id: int
    handle: int
    dy: Tensor
    need_dx: bool
    need_dw: bool
    release: tuple[int, ...] = ()


@dataclass(frozen=True)
class Install:
    """Keep W' as resident weight `weight` (replacing any previous copy, its optimizer state and gradient)."""

    job_id: int
    weight: int
    w: Tensor


@dataclass(frozen=True)
class Update:
    """Apply one optimizer step to resident weights, as the enclave's optimizer did to the plaintext ones.

    ``entries`` holds one JSON object per weight: ``weight`` (id), ``hyper`` (the optimizer's
    constructor arguments for that weight's parameter group), ``scale`` (the gradient is the sum
    of the worker's own dW' since the last update times this; null: the gradient is the tensor
    ``grad/<id>``, or there is none and the step skips the weight (``skip``)), and ``state``
    (null, or the optimizer state to adopt before stepping: its scalars here, its tensors as
    ``state/<id>/<name>``). Element-wise optimizers commute with permutations, so W' stays the
    blinding of the enclave's W.
    """

    job_id: int
    optimizer: str  # torch.optim class name: SGD, Adam or AdamW
    entries: list
    tensors: dict[str, Tensor] = field(default_factory=dict)


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


def message_tensors(msg: object) -> list[tuple[str, Tensor]]:
    """Every tensor a message carries, by field name (operands first, then named result/update tensors)."""
    out = [(name, t) for name in ("x", "w", "dy") if (t := getattr(msg, name, None)) is not None]
    return out + list(getattr(msg, "tensors", {}).items())


Job = ForwardJob | BackwardJob | Install | Update
Reply = Result | Failure
Message = ForwardJob | BackwardJob | Install | Update | Result | Failure | Shutdown
