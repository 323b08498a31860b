"""`protect`: wrap an unmodified model so that every product it computes is offloaded.

The engine holds what lives in the enclave for a run: the worker pool, the scheme, the key
stream, the integrity settings and the counters. The protected model runs the user's module
unchanged under :class:`~tempo.enclave.intercept.OffloadMode`; parameters, optimizer and loss
stay ordinary PyTorch objects in the enclave.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import (
    ConfigError,
    IntegrityError,
    ProtocolError,
    UnsupportedModelError,
    WorkerError,
    WorkerLostError,
    WorkerSlowError,
    WorkerTimeoutError,
)
from ..products import OpShapes, Product, ProductKind
from ..schemes import Scheme, get_scheme
from . import ops  # noqa: F401  (registers the op handlers)
from .anchors import Anchors
from .integrity import verify
from .intercept import OffloadMode, warn_once
from .keys import KeyStream
from .pools import WorkerPool
from .protocol import OffloadStats
from .residency import Residency
from .truth import GroundTruth

# Module types whose products Tempo cannot offload; they run in the enclave (or are refused).
NOT_OFFLOADED: tuple[type[nn.Module], ...] = (
    nn.RNNBase, nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
)


class Engine:
    """Per-run enclave state shared by every offloaded op of one protected model."""

    def __init__(self, pool: WorkerPool, scheme: Scheme, *, checks: int, rng: KeyStream,
                 anchors: Anchors | None = None, unfold_convs: bool = False, truth: GroundTruth | None = None):
        self.pool, self.scheme, self.checks, self.rng = pool, scheme, checks, rng
        self.anchors = anchors or Anchors(offload=True)
        self.unfold_convs = unfold_convs  # offload convolutions as unfolded products (positions blinded too)
        self.truth = truth
        self.residency: Residency | None = None  # key lifetime K > 1: resident weights (set by protect)
        self.stats = OffloadStats()
        self.step = 0
        self.scope: list[str] = []
        self._ids = itertools.count(1)
        self._rr = itertools.cycle(range(pool.size))
        self._releases: dict[int, list[int]] = {}
        self._warned: set = set()
        self.retired: dict[int, str] = {}  # worker index -> why it gets no more work
        self.faults: list[dict] = []  # every fault, in order: worker, op, step, kind, detail

    def new_id(self) -> int:
        return next(self._ids)

    def next_worker(self) -> int:
        """The next worker in turn that has not been retired."""
        for _ in range(self.pool.size):
            worker = next(self._rr)
            if worker not in self.retired:
                return worker
        raise WorkerError("no workers left: " + "; ".join(f"{self.pool.name(w)} {why}"
                                                           for w, why in self.retired.items()))

    def shards(self, kind: ProductKind, x: Tensor, w: Tensor) -> int:
        """Into how many row shards to split an invocation of a product whose rows are independent
        samples (linear, conv2d): up to one per live worker, but no more than X holds weights' worth of
        values (each shard costs a W' out and a dW' back, so an op whose weight outweighs its rows, a
        late convolution on a small map, is not worth splitting). Not split: batched matmuls (a batch
        entry is a head or a group, not a sample), resident weights (they live on one worker), and
        recorded runs (the leakage suite models one job per op)."""
        if kind.name not in ("linear", "conv2d") or self.residency is not None or self.truth is not None:
            return 1
        return max(1, min(self.pool.size - len(self.retired), x.shape[0], x.numel() // w.numel()))

    def can_replace(self, worker: int) -> bool:
        """Whether another live worker could take over `worker`'s work."""
        return any(w != worker and w not in self.retired for w in range(self.pool.size))

    def retire(self, worker: int, error: Exception, *, op: str, step: int) -> None:
        """Give `worker` no more work, for the rest of the run: it died, stalled, failed, lied or crawled."""
        kind = ("lied" if isinstance(error, IntegrityError) else "stalled" if isinstance(error, WorkerTimeoutError)
                else "lost" if isinstance(error, WorkerLostError) else "malformed" if isinstance(error, ProtocolError)
                else "slow" if isinstance(error, WorkerSlowError) else "failed")
        name = self.pool.name(worker)
        self.retired[worker] = f"{kind} at op '{op}', step {step}"
        self._releases.pop(worker, None)
        self.faults.append({"worker": name, "op": op, "step": step, "kind": kind,
                            "detail": " ".join(str(error).split())[:300]})
        warnings.warn(f"tempo: worker {name} {kind} at op '{op}', step {step}; it gets no more work and its job "
                      f"runs on another worker ({' '.join(str(error).split())[:200]})", stacklevel=2)

    def op_name(self, function: str) -> str:
        """Qualified name of the module that is running, plus the function when it is functional."""
        module = self.scope[-1] if self.scope else "<model>"
        return module if function in ("linear", "conv2d") else f"{module}:{function}"

    def release(self, worker: int, handle: int) -> None:
        self._releases.setdefault(worker, []).append(handle)

    def take_releases(self, worker: int) -> tuple[int, ...]:
        return tuple(self._releases.pop(worker, ()))

    def verify(self, kind: ProductKind, product: Product, u: Tensor, v: Tensor, claim: Tensor,
               shapes: OpShapes) -> str | None:
        return verify(kind, product, u, v, claim, shapes=shapes, checks=self.checks, rng=self.rng)

    def note_in_enclave(self, func: Callable) -> None:
        name = getattr(func, "__name__", str(func))
        where = self.scope[-1] if self.scope else "<model>"
        warn_once(self._warned, (where, name),
                  f"tempo: '{where}' calls {name}, which is not offloaded: it runs inside the enclave")


class ProtectedModel(nn.Module):
    """The user's model, run with every product offloaded. ``.module`` is the original model."""

    def __init__(self, module: nn.Module, engine: Engine):
        super().__init__()
        self.module = module
        self.engine = engine
        self._hooks = [h for name, m in module.named_modules() for h in self._scope_hooks(name or "<model>", m)]

    def _scope_hooks(self, name: str, m: nn.Module) -> list:
        scope = self.engine.scope
        pre = m.register_forward_pre_hook(lambda *_: scope.append(name))
        post = m.register_forward_hook(lambda *_: scope.pop() and None, always_call=True)
        return [pre, post]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            self.engine.step += 1
        completed = False
        try:
            with OffloadMode(self.engine):
                out = self.module(*args, **kwargs)
            completed = True
            return out
        finally:
            self.engine.anchors.end_forward(completed)


def validate_model(model: nn.Module) -> list[str]:
    """Every layer whose products cannot be offloaded, by qualified name (all of them, not the first)."""
    return [f"{name or '<model>'} ({type(m).__name__})" for name, m in model.named_modules()
            if isinstance(m, NOT_OFFLOADED)]


def protect(model: nn.Module, workers: WorkerPool, *, scheme: str | Scheme = "mix", checks: int = 2,
            strict: bool = False, offload_anchors: bool = False, unfold_convs: bool = False, key_lifetime: int = 1,
            key_seed: int | None = None, truth: GroundTruth | None = None) -> ProtectedModel:
    """Wrap `model` so every linear, convolution and attention product runs blinded on `workers`.

    Args:
        model: any nn.Module; it is not modified apart from forward hooks that name its ops.
        workers: a pool from :func:`tempo.local_workers`.
        scheme: blinding scheme name: ``"mix"`` (dense mixing keys, the default), ``"permute"`` (the paper's
            permutations: cheaper, leaks the model to the leakage suite; needed for key_lifetime > 1) or
            ``"none"`` (the insecure reference).
        checks: Freivalds vectors per product (t); a wrong result slips through with prob <= 2^-t.
        strict: refuse layers that cannot be offloaded instead of running them in the enclave.
        offload_anchors: also offload the model's first product (it sees the raw inputs) and last
            product (its output gradient carries the labels). By default they run in the enclave,
            learned from the first forward, which runs wholly in the enclave.
        unfold_convs: offload convolutions unfolded (im2col), so that the row key shuffles spatial
            positions as well as samples; X' grows k²/stride²-fold, and unfolded weights are not
            kept resident (key_lifetime).
        key_lifetime: training steps each weight keeps its key (K). 1: fresh keys for every product.
            K > 1: W' stays resident on a worker, which repeats each SGD/Adam/AdamW step on it in
            blinded form: less traffic, but a worker sees one weight under one key for K steps.
        key_seed: make keys reproducible. Predictable keys are insecure: tests and experiments only.
        truth: record every op's key for the leakage suite (``tempo train --record``); evaluation only.
    """
    blinding = get_scheme(scheme)
    if checks < 0:
        raise ConfigError(f"checks must be >= 0, got {checks}")
    if not isinstance(key_lifetime, int) or isinstance(key_lifetime, bool) or key_lifetime < 1:
        raise ConfigError(f"key_lifetime must be an integer >= 1, got {key_lifetime!r}")
    if key_lifetime > 1 and not blinding.updates_commute:
        raise ConfigError(f"scheme '{blinding.name}' cannot update blinded weights element-wise: "
                          "it needs key_lifetime=1 (key lifetimes K > 1 work with scheme 'permute')")
    if not blinding.secure:
        warnings.warn(f"tempo: scheme '{blinding.name}' is INSECURE: {blinding.summary}", stacklevel=2)
    if checks == 0:
        warnings.warn("tempo: checks=0 disables integrity checks: workers' results are used unverified",
                      stacklevel=2)
    offenders = validate_model(model)
    if offenders and strict:
        raise UnsupportedModelError(offenders)
    for o in offenders:
        warnings.warn(f"tempo: {o} cannot be offloaded and runs inside the enclave", stacklevel=2)
    engine = Engine(workers, blinding, checks=checks, rng=KeyStream(key_seed), anchors=Anchors(offload_anchors),
                    unfold_convs=unfold_convs, truth=truth)
    if key_lifetime > 1:
        engine.residency = Residency(engine, key_lifetime, model)
    return ProtectedModel(model, engine)
