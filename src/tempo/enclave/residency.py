"""Key lifetime K > 1: weights stay resident on their workers and are updated there in blinded form.

Each parameter used as the weight of an offloaded product gets a key for its inner and output
axes that it keeps for K training steps (rows keep a fresh key per invocation) and a home
worker. The enclave installs W' once per key, so forward jobs carry only X'. After each
optimizer step it sends the step's hyperparameters (and, the first time, the optimizer state in
blinded form) and the worker repeats the step on W' with the dW' it computed itself: SGD, Adam
and AdamW act element by element, so stepping a permuted weight with its permuted gradient gives
the permuted result. If the plaintext gradient is not that sum (a global-norm clip scales it:
then only the scale is sent; anything else: the blinded gradient is sent) the worker is told.

The enclave's plaintext parameter and optimizer stay the authoritative copy, so checkpoints and
evaluation see plaintext weights, and every product is still verified against them: a worker
whose W' drifts or lies fails the next check. A weight changed outside an optimizer step (say,
``load_state_dict``) is installed afresh under a new key at its next use.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..errors import ConfigError, IntegrityError, WorkerError
from ..products import KeyShape, Layout, ProductKind
from ..schemes import Operand
from ..wire.messages import UPDATABLE_OPTIMIZERS, Failure, Install, Job, Result, Update
from ..wire.text import printable

if TYPE_CHECKING:
    from .engine import Engine

SCALE_RTOL = 1e-5  # a gradient within this relative residual of (accumulated dW) x scalar counts as scaled


@dataclass
class ResidentWeight:
    """The enclave's record of one parameter whose W' lives on a worker."""

    name: str
    param: nn.Parameter
    weight_id: int
    worker: int = -1  # home worker, fixed at the first install
    kind: str = ""
    layout: Layout = ()
    key: Any = None  # the held key (its row axes unused)
    installed_step: int = -1  # training step of the last install; -1: not installed (or lost)
    version: tuple[int, int] = (-1, -1)  # the parameter's (_version, data_ptr) that W' blinds
    generation: int = 0  # bumped by every install and update: which W' a forward used
    pending: Tensor | None = None  # verified dW summed since the last optimizer step (plaintext)
    worker_pending: bool = True  # the worker's dW' sum covers the same backward jobs as `pending`
    synced_with: weakref.ref | None = None  # the optimizer whose state the worker's replica holds
    plan: tuple[int, dict, dict[str, Tensor]] | None = None  # (optimizer id, Update entry, tensors)

    def param_version(self) -> tuple[int, int]:
        return self.param._version, self.param.data_ptr()


class Residency:
    """Every resident weight of one protected model, and the optimizer hooks that keep them in step."""

    def __init__(self, engine: Engine, lifetime: int, module: nn.Module):
        self.engine, self.lifetime = engine, lifetime
        self._weights = {id(p): ResidentWeight(name, p, i)
                         for i, (name, p) in enumerate(module.named_parameters(), start=1)}
        self._watched: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._ref = ref = weakref.ref(self)
        hooks = [register_optimizer_step_pre_hook(lambda opt, *_: _call(ref, "before_step", opt)),
                 register_optimizer_step_post_hook(lambda opt, *_: _call(ref, "after_step", opt))]
        weakref.finalize(self, _remove_hooks, hooks)

    def use(self, w: Tensor, kind: ProductKind, shape: KeyShape) -> ResidentWeight | None:
        """The resident record for weight operand `w`, installed under a fresh key if due; None if `w`
        is not one of the model's parameters (an activation, or a tensor derived from a parameter)."""
        r = self._weights.get(id(w))
        if r is None or r.param is not w:
            return None
        if r.kind and r.kind != kind.name:
            raise ConfigError(f"parameter '{r.name}' is the weight of both {r.kind} and {kind.name} products; "
                              "key_lifetime > 1 needs one kind of product per weight")
        eng = self.engine
        if r.installed_step < 0 or eng.step - r.installed_step >= self.lifetime or r.version != r.param_version():
            self._install(r, kind, shape)
        return r

    def accumulate(self, r: ResidentWeight, dw: Tensor) -> None:
        """A verified dW of `r`: the worker added the same dW' to its own sum."""
        r.pending = dw.clone() if r.pending is None else r.pending.add_(dw)

    def _install(self, r: ResidentWeight, kind: ProductKind, shape: KeyShape) -> None:
        eng = self.engine
        if r.worker < 0:
            r.worker = eng.next_worker()
        key = eng.scheme.new_key(shape, eng.rng)
        layout = kind.layouts().w
        w = eng.scheme.blind(r.param.detach(), layout, Operand.W, key)
        self._acknowledge(r.worker, Install(eng.new_id(), r.weight_id, w), f"install of '{r.name}'")
        r.kind, r.layout, r.key = kind.name, layout, key
        r.installed_step, r.version, r.generation = eng.step, r.param_version(), r.generation + 1
        r.worker_pending = r.pending is None  # the worker dropped its dW' sum with its old W'
        r.synced_with = None

    # -- optimizer steps -----------------------------------------------------------------------
    def _stepped(self, optimizer: torch.optim.Optimizer) -> list[tuple[ResidentWeight, dict]]:
        return [(r, group) for group in optimizer.param_groups for p in group["params"]
                if (r := self._weights.get(id(p))) is not None and r.param is p and r.installed_step >= 0]

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse optimizers a worker cannot repeat; settle each resident gradient and plan its update."""
        stepped = self._stepped(optimizer)
        if not stepped:
            return
        name = type(optimizer).__name__
        if name not in UPDATABLE_OPTIMIZERS or type(optimizer) is not getattr(torch.optim, name):
            raise ConfigError(
                f"key_lifetime={self.lifetime}: workers update resident weights in blinded form with "
                f"{', '.join(UPDATABLE_OPTIMIZERS)} only (element-wise optimizers), not "
                f"{type(optimizer).__qualname__}; use one of those or key_lifetime=1")
        for r, group in stepped:
            r.plan = (id(optimizer), *self._plan(r, optimizer, group))

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Send each home worker the updates planned for this step; a failed update loses its weights."""
        if optimizer not in self._watched:  # its state may be replaced wholesale: then resend it
            self._watched.add(optimizer)
            ref = self._ref
            optimizer.register_load_state_dict_post_hook(lambda opt: _call(ref, "forget_state", opt))
        by_worker: dict[int, list[ResidentWeight]] = {}
        for r, _ in self._stepped(optimizer):
            if r.plan is not None and r.plan[0] == id(optimizer):
                by_worker.setdefault(r.worker, []).append(r)
        eng, done = self.engine, set()
        try:
            for worker, weights in by_worker.items():
                entries = [r.plan[1] for r in weights]
                tensors = {k: t for r in weights for k, t in r.plan[2].items()}
                self._acknowledge(worker, Update(eng.new_id(), type(optimizer).__name__, entries, tensors),
                                  f"optimizer step of {len(weights)} resident weight(s)")
                for r in weights:
                    r.synced_with, r.version, r.generation = weakref.ref(optimizer), r.param_version(), r.generation + 1
                done.add(worker)
        except BaseException:
            for worker, weights in by_worker.items():
                if worker not in done:
                    for r in weights:
                        r.installed_step = -1  # that worker's W' is unknown now: install afresh at the next use
            raise
        finally:
            for weights in by_worker.values():
                for r in weights:
                    r.plan, r.pending, r.worker_pending = None, None, True

    def forget_state(self, optimizer: torch.optim.Optimizer) -> None:
        """`optimizer` loaded a state dict: its next step sends each resident weight's state again."""
        for r, _ in self._stepped(optimizer):
            r.synced_with = None

    def _plan(self, r: ResidentWeight, optimizer: torch.optim.Optimizer, group: dict
              ) -> tuple[dict, dict[str, Tensor]]:
        """One Update entry and its tensors: the gradient as a scale of the worker's sum (or blinded), the
        group's hyperparameters, and the optimizer state when the worker's replica is not in sync."""
        grad = r.param.grad
        if grad is None:
            return {"weight": r.weight_id, "skip": True}, {}
        blind = self._blinder(r)
        entry: dict = {"weight": r.weight_id, "hyper": _hyperparameters(optimizer, group)}
        tensors: dict[str, Tensor] = {}
        entry["scale"] = self._settle(r, grad)
        if entry["scale"] is None:
            tensors[f"grad/{r.weight_id}"] = blind(grad)
        if r.synced_with is None or r.synced_with() is not optimizer:
            scalars: dict[str, float] = {}
            for key, value in optimizer.state.get(r.param, {}).items():
                if isinstance(value, Tensor) and value.shape == r.param.shape:
                    tensors[f"state/{r.weight_id}/{key}"] = blind(value)
                elif isinstance(value, Tensor) and value.numel() == 1:
                    scalars[key] = float(value)
                elif value is not None:
                    raise ConfigError(f"cannot send {type(optimizer).__name__} state {key!r} of '{r.name}' "
                                      f"({type(value).__name__}) to its worker")
            entry["state"] = scalars
        return entry, tensors

    def _settle(self, r: ResidentWeight, grad: Tensor) -> float | None:
        """The scale s with grad == s x (the worker's dW sum), making it exactly so; None if it is not one."""
        if r.pending is None or not r.worker_pending or grad.shape != r.pending.shape:
            return None
        if torch.equal(grad, r.pending):
            return 1.0
        norm = float(torch.linalg.vector_norm(r.pending))
        if norm == 0:
            return None
        scale = float(torch.linalg.vector_norm(grad)) / norm
        scaled = r.pending.mul(scale)  # the worker computes exactly this from its own sum
        if float(torch.linalg.vector_norm(grad - scaled)) > SCALE_RTOL * scale * norm:
            return None
        grad.copy_(scaled)
        return scale

    def _blinder(self, r: ResidentWeight):
        eng = self.engine
        return lambda t: eng.scheme.blind(t.detach(), r.layout, Operand.W, r.key)

    def _acknowledge(self, worker: int, job: Job, what: str) -> None:
        """Send an Install or Update and insist on a bare acknowledgement."""
        eng = self.engine
        name = eng.pool.name(worker)
        try:
            reply = eng.pool.call(worker, job, payload_bytes=0)  # a bare acknowledgement
        except WorkerError as e:
            raise type(e)(f"{what} at step {eng.step}: {e}") from None
        if isinstance(reply, Failure):
            raise WorkerError(f"worker {name} failed the {what} at step {eng.step}: {printable(reply.message)}")
        if not isinstance(reply, Result) or reply.job_id != job.job_id or reply.tensors:
            eng.stats.checks_failed += 1
            raise IntegrityError(op=what, product=type(job).__name__.lower(), step=eng.step, worker=name,
                                 detail=f"reply {type(reply).__name__} does not acknowledge job #{job.job_id}")


def _hyperparameters(optimizer: torch.optim.Optimizer, group: dict) -> dict:
    """The group's constructor arguments as JSON values; the enclave's CPU optimizer uses the single-tensor
    path (foreach/fused unset), so the worker is told to use it too and rounds the same way."""
    accepted = inspect.signature(type(optimizer)).parameters
    out = {}
    for key, default in optimizer.defaults.items():
        if key not in accepted:  # e.g. AdamW's fixed decoupled_weight_decay
            continue
        value = group.get(key, default)
        if isinstance(value, Tensor):
            value = value.item()
        if key in ("foreach", "fused") and value is None:
            value = False
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _call(ref: weakref.ref, method: str, optimizer: torch.optim.Optimizer) -> None:
    residency = ref()
    if residency is not None:
        getattr(residency, method)(optimizer)


def _remove_hooks(hooks: list) -> None:
    for h in hooks:
        h.remove()
