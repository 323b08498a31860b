"""Blind -> send -> compute -> verify -> unblind: written once for every offloaded product.

An :class:`OffloadedOp` is one invocation of one op. Its forward draws a fresh key, blinds X and
W, and sends them to a worker, which keeps what the backward will need. Its backward blinds only
dY (same key), and the worker answers dX' and dW' from what it kept. Every reply is treated as
hostile: job id, names, dtype and shape are checked first, then each product is verified with
Freivalds checks. Under an exact scheme (a permutation) they run in plaintext space: the same
test as on the blinded product, and the enclave keeps no blinded copies. Under a scheme whose
unblinding rounds (``Scheme.exact`` false, e.g. ``mix``) the blinded result itself is checked
against the blinded operands, which the enclave then keeps until the backward, as the worker
does. A result that fails is never returned.

With a key lifetime K > 1 a parameter's W' is resident on its home worker
(:mod:`tempo.enclave.residency`): the op then sends only X', under the weight's held inner key.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from ..errors import ConfigError, IntegrityError, ProtocolError, WorkerError
from ..products import OpShapes, Product, ProductKind
from ..schemes import Operand
from ..wire.messages import BackwardJob, Failure, ForwardJob, Job, Reply, Result

if TYPE_CHECKING:
    from .engine import Engine
    from .residency import ResidentWeight

T = TypeVar("T")


@dataclass
class OffloadStats:
    """Counters the engine keeps across a run (benchmarks and metrics read them)."""

    products: dict[str, int] = field(default_factory=dict)
    worker_seconds: float = 0.0  # wall time spent waiting on workers
    checks_failed: int = 0

    def count(self, product: Product) -> None:
        self.products[product.value] = self.products.get(product.value, 0) + 1


class OffloadedOp:
    """One invocation of an offloaded bilinear op: its key, its worker, its kept handle."""

    def __init__(self, engine: Engine, kind: ProductKind, name: str):
        self.engine, self.kind, self.name = engine, kind, name
        self.step = engine.step
        self.worker = -1
        self.handle = engine.new_id()
        self.key = None
        self.shapes: OpShapes | None = None
        self.keep_x = self.keep_w = False
        self.resident: ResidentWeight | None = None
        self._generation = 0  # the resident W' this invocation's forward used
        self._blinded: tuple[Tensor | None, Tensor | None] = (None, None)  # X', W' kept to check the backward
        self._finalizer: weakref.finalize | None = None

    def forward(self, x: Tensor, w: Tensor, *, keep_x: bool, keep_w: bool) -> Tensor:
        problem = self.kind.check_operands(x.shape, w.shape)
        if problem:
            raise ValueError(f"op '{self.name}': {problem}")
        eng = self.engine
        self.shapes = OpShapes(x.shape, w.shape, self.kind.output_shape(x.shape, w.shape))
        shape = self.kind.key_shape(x.shape, w.shape)
        self.resident = eng.residency.use(w, self.kind, shape) if eng.residency is not None else None
        if self.resident is None:
            self.worker = eng.next_worker()
            self.key = eng.scheme.new_key(shape, eng.rng)
        else:
            self.worker, self._generation = self.resident.worker, self.resident.generation
            self.key = eng.scheme.with_fresh_rows(self.resident.key, shape, eng.rng)
        self.keep_x, self.keep_w = keep_x, keep_w
        return self._failover(lambda: self._submit_forward(x, w))

    def _failover(self, attempt: Callable[[], T]) -> T:
        """Run `attempt`; when its worker dies, stalls, fails, lies or speaks out of protocol, retire that
        worker and run it again
        on the next live one (same key: the new worker sees what the old one saw). Work whose worker was
        retired meanwhile (a backward whose forward ran there) moves before it is tried. A resident
        weight (key lifetime K > 1) lives on one worker, so its ops do not move; nor does work when no
        live worker is left, which raises the last error."""
        eng = self.engine
        while True:
            if self.worker in eng.retired and self.resident is None:
                self._move()
            try:
                return attempt()
            except (WorkerError, IntegrityError, ProtocolError) as e:
                if self.resident is not None or not eng.can_replace(self.worker):
                    raise
                eng.retire(self.worker, e, op=self.name, step=self.step)

    def _move(self) -> None:
        """Take this op to the next live worker; what the old one kept is gone with it."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.worker = self.engine.next_worker()

    def _submit_forward(self, x: Tensor, w: Tensor) -> Tensor:
        eng, layouts = self.engine, self.kind.layouts()
        xb = eng.scheme.blind(x.detach(), layouts.x, Operand.X, self.key)
        wb = None if self.resident else eng.scheme.blind(w.detach(), layouts.w, Operand.W, self.key)
        job = ForwardJob(
            job_id=eng.new_id(), handle=self.handle, kind=self.kind.name, params=self.kind.params(), x=xb, w=wb,
            keep_x=self.keep_x, keep_w=self.keep_w, release=eng.take_releases(self.worker),
            weight=self.resident.weight_id if self.resident else 0)
        if eng.truth is not None and (self.keep_x or self.keep_w):  # training traffic only, as recorded
            eng.truth.op(self.step, self.handle, self.name, self.kind.name, eng.scheme.key_tensors(self.key))
        if self.keep_x or self.keep_w:  # if the backward never comes, tell the worker to drop what it kept
            self._finalizer = weakref.finalize(self, eng.release, self.worker, self.handle)
        (y,) = self._call(job, "forward", {"y": (self.shapes.y, x.dtype)})
        if eng.scheme.exact:
            y = eng.scheme.unblind(y, layouts.y, Operand.Y, self.key)
            self._verify(Product.FORWARD, x, w, y)
            return y
        self._verify(Product.FORWARD, xb, wb, y)
        self._blinded = (xb if self.keep_x else None, wb if self.keep_w else None)
        return eng.scheme.unblind(y, layouts.y, Operand.Y, self.key)

    def backward(self, dy: Tensor, x: Tensor, w: Tensor, *, need_dx: bool, need_dw: bool
                 ) -> tuple[Tensor | None, Tensor | None]:
        if self.resident is not None and self.resident.generation != self._generation:
            raise ConfigError(f"op '{self.name}': its weight '{self.resident.name}' got a new key (a later "
                              "forward began its next key period) before this forward's backward; with "
                              "key_lifetime > 1 run each backward before the next training forward")
        return self._failover(lambda: self._submit_backward(dy, x, w, need_dx=need_dx, need_dw=need_dw))

    def _submit_backward(self, dy: Tensor, x: Tensor, w: Tensor, *, need_dx: bool, need_dw: bool
                         ) -> tuple[Tensor | None, Tensor | None]:
        if self._finalizer is None:
            # The worker no longer holds X', W': a second backward through a retained graph (it freed
            # them after the first), or a new worker after a fault. Send them again under a new handle
            # (same key) rather than keep them for every op.
            self.handle = self.engine.new_id()
            self._submit_forward(x, w)
        if self._finalizer is not None:
            self._finalizer.detach()  # the backward job itself frees the handle
            self._finalizer = None
        if not (need_dx or need_dw):
            self.engine.release(self.worker, self.handle)
            return None, None
        eng, layouts = self.engine, self.kind.layouts()
        dy = dy.to(x.dtype).contiguous()
        job = BackwardJob(job_id=eng.new_id(), handle=self.handle,
                          dy=eng.scheme.blind(dy, layouts.y, Operand.DY, self.key),
                          need_dx=need_dx, need_dw=need_dw, release=eng.take_releases(self.worker))
        expect = {}
        if need_dx:
            expect["dx"] = (self.shapes.x, x.dtype)
        if need_dw:
            expect["dw"] = (self.shapes.w, x.dtype)
        results = dict(zip(expect, self._call(job, "backward", expect), strict=True))
        if eng.scheme.exact:  # unblinding is exact: check in plaintext space, keep no blinded copies
            results = self._unblind_grads(results)
            operands = {"dx": (dy, w), "dw": (x, dy)}
        else:  # check what the worker computed, then unblind
            (xb, wb), self._blinded = self._blinded, (None, None)
            operands = {"dx": (job.dy, wb), "dw": (xb, job.dy)}
        for name, product in (("dx", Product.GRAD_INPUT), ("dw", Product.GRAD_WEIGHT)):
            if name in results:
                self._verify(product, *operands[name], results[name])
        if not eng.scheme.exact:
            results = self._unblind_grads(results)
        dx, dw = results.get("dx"), results.get("dw")
        if dw is not None and self.resident is not None:
            eng.residency.accumulate(self.resident, dw)
        return dx, dw

    def _unblind_grads(self, results: dict[str, Tensor]) -> dict[str, Tensor]:
        layouts = self.kind.layouts()
        where = {"dx": (layouts.x, Operand.DX), "dw": (layouts.w, Operand.DW)}
        return {name: self.engine.scheme.unblind(t, *where[name], self.key) for name, t in results.items()}

    # -- hostile-reply handling ------------------------------------------------------------------
    def _call(self, job: Job, label: str, expect: dict[str, tuple[torch.Size, torch.dtype]]
              ) -> list[Tensor]:
        eng = self.engine
        start = time.perf_counter()
        try:
            reply = eng.pool.call(self.worker, job)
        except WorkerError as e:
            raise type(e)(f"op '{self.name}' ({label}) at step {self.step}: {e}") from None
        finally:
            eng.stats.worker_seconds += time.perf_counter() - start
        return self._validate(reply, job, label, expect)

    def _validate(self, reply: Reply, job: Job, label: str,
                  expect: dict[str, tuple[torch.Size, torch.dtype]]) -> list[Tensor]:
        worker = self.engine.pool.name(self.worker)
        if isinstance(reply, Failure):
            raise WorkerError(f"worker {worker} failed op '{self.name}' ({label}) at step "
                              f"{self.step}: {reply.message}")

        def lie(detail: str) -> IntegrityError:
            self.engine.stats.checks_failed += 1
            return IntegrityError(op=self.name, product=label, step=self.step, worker=worker,
                                  detail=detail)

        if not isinstance(reply, Result) or reply.job_id != job.job_id:
            raise lie(f"reply {type(reply).__name__} #{getattr(reply, 'job_id', '?')} does not answer "
                      f"job #{job.job_id}")
        if set(reply.tensors) != set(expect):
            raise lie(f"reply carries tensors {sorted(reply.tensors)}, expected {sorted(expect)}")
        out = []
        for name, (shape, dtype) in expect.items():
            t = reply.tensors[name]
            if t.shape != shape or t.dtype != dtype:
                raise lie(f"result '{name}' is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
            out.append(t)
        return out

    def _verify(self, product: Product, u: Tensor, v: Tensor, claim: Tensor) -> None:
        eng = self.engine
        eng.stats.count(product)
        problem = eng.verify(self.kind, product, u.detach(), v.detach(), claim, self.shapes)
        if problem:
            eng.stats.checks_failed += 1
            if self.resident is not None:
                problem += (f" (W' of '{self.resident.name}' is resident on the worker; writing the weight "
                            "through .data, which Tempo cannot see, also causes this)")
            raise IntegrityError(op=self.name, product=product.value, step=self.step,
                                 worker=eng.pool.name(self.worker), detail=problem)
