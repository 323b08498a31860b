"""Resident weights: a W' that stays on this worker for a key's lifetime and is updated here.

With a key lifetime K > 1 the enclave installs W' once per key and, after every optimizer step,
sends only the step's hyperparameters. The worker repeats the step on W' with the dW' it
computed itself (summed over the step's backward jobs): SGD, Adam and AdamW act element by
element, so stepping a permuted weight with its permuted gradient gives the permuted result.
Nothing here is trusted: a wrong update makes the next product fail the enclave's checks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..wire.messages import UPDATABLE_OPTIMIZERS


class ResidentWeight:
    """One installed W' with the gradient accumulated since the last update and its optimizer replica."""

    def __init__(self, w: Tensor):
        self.w = w
        self.pending: Tensor | None = None  # sum of this worker's dW' since the last update
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.pending) if t is not None)

    def accumulate(self, dw: Tensor) -> None:
        """Add a backward job's dW' (in arrival order, as autograd accumulates the plaintext dW)."""
        self.pending = dw.clone() if self.pending is None else self.pending.add_(dw)

    def update(self, optimizer: str, entry: dict, tensors: dict[str, Tensor], weight: int) -> None:
        """One optimizer step as described by an Update entry; raises ValueError on a bad entry."""
        grad = self._gradient(entry, tensors, weight)
        self.pending = None
        if grad is None:
            return
        hyper = entry.get("hyper")
        if not isinstance(hyper, dict):
            raise ValueError(f"weight {weight}: 'hyper' must be an object")
        self._prepare(optimizer, hyper, entry.get("state"), tensors, weight)
        assert self.optimizer is not None
        self.w.grad = grad
        self.optimizer.step()
        self.w.grad = None

    def _gradient(self, entry: dict, tensors: dict[str, Tensor], weight: int) -> Tensor | None:
        if entry.get("skip") is True:
            return None
        scale = entry.get("scale")
        if scale is None:
            grad = tensors.get(f"grad/{weight}")
            if grad is None:
                raise ValueError(f"weight {weight}: no scale and no gradient tensor")
            if grad.shape != self.w.shape or grad.dtype != self.w.dtype:
                raise ValueError(f"weight {weight}: gradient is {grad.dtype} {list(grad.shape)}, "
                                 f"W' is {self.w.dtype} {list(self.w.shape)}")
            return grad.to(self.w.device)
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ValueError(f"weight {weight}: scale must be a finite number, got {scale!r}")
        if self.pending is None:
            raise ValueError(f"weight {weight}: no dW' was computed since the last update")
        return self.pending.mul(scale)

    def _prepare(self, optimizer: str, hyper: dict, state: dict | None, tensors: dict[str, Tensor],
                 weight: int) -> None:
        if optimizer not in UPDATABLE_OPTIMIZERS:
            raise ValueError(f"unsupported optimizer {optimizer!r}; workers repeat {list(UPDATABLE_OPTIMIZERS)}")
        cls = getattr(torch.optim, optimizer)
        if self.optimizer is None or type(self.optimizer) is not cls:
            if state is None:
                raise ValueError(f"weight {weight}: first {optimizer} step without its optimizer state")
            try:
                self.optimizer = cls([self.w], **hyper)
            except (TypeError, ValueError) as e:
                raise ValueError(f"weight {weight}: bad {optimizer} arguments: {e}") from None
        unknown = set(hyper) - set(self.optimizer.defaults)
        if unknown:
            raise ValueError(f"weight {weight}: unknown {optimizer} arguments {sorted(unknown)}")
        self.optimizer.param_groups[0].update(hyper)
        if state is not None:
            self.optimizer.state[self.w] = self._state(state, tensors, weight, hyper)

    def _state(self, scalars: dict, tensors: dict[str, Tensor], weight: int, hyper: dict) -> dict:
        if not isinstance(scalars, dict):
            raise ValueError(f"weight {weight}: 'state' must be an object")
        on_device = bool(hyper.get("capturable") or hyper.get("fused"))
        state: dict[str, Tensor] = {}
        for name, value in scalars.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"weight {weight}: state scalar {name!r} must be a number")
            state[name] = torch.tensor(float(value), dtype=torch.float32,
                                       device=self.w.device if on_device else "cpu")
        prefix = f"state/{weight}/"
        for key, t in tensors.items():
            if key.startswith(prefix):
                if t.shape != self.w.shape or t.dtype != self.w.dtype:
                    raise ValueError(f"weight {weight}: state tensor {key!r} is {t.dtype} {list(t.shape)}, "
                                     f"W' is {self.w.dtype} {list(self.w.shape)}")
                state[key[len(prefix):]] = t.to(self.w.device)
        return state
