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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from torch import Tensor

from ..errors import ConfigError, IntegrityError, ProtocolError, WorkerError, WorkerSlowError
from ..products import OpShapes, Product, ProductKind
from ..schemes import Operand
from ..wire.messages import BackwardJob, Failure, ForwardJob, Job, Reply, Result
from ..wire.text import printable

if TYPE_CHECKING:
    from .engine import Engine
    from .residency import ResidentWeight

T = TypeVar("T")
Expect = dict[str, tuple[torch.Size, torch.dtype]]  # the tensors a reply must carry: name -> (shape, dtype)
WORKER_FAULTS = (WorkerError, IntegrityError, ProtocolError)


def expected_bytes(expect: Expect) -> int:
    """The tensor bytes of the reply `expect` describes: all a worker's answer may carry (the wire
    refuses a larger one before allocating it)."""
    return sum(shape.numel() * dtype.itemsize for shape, dtype in expect.values())


@dataclass
class OffloadStats:
    """Counters the engine keeps across a run (benchmarks and metrics read them)."""

    products: dict[str, int] = field(default_factory=dict)
    worker_seconds: float = 0.0  # wall time spent waiting on workers
    checks_failed: int = 0

    def count(self, product: Product) -> None:
        self.products[product.value] = self.products.get(product.value, 0) + 1


@dataclass
class Stage(Generic[T]):
    """One op invocation's part in a round: `start` blinds and builds its job, `finish` checks and unblinds
    the reply's tensors, `redo` runs the whole of it alone (under failover). No `start`: it runs alone."""

    op: OffloadedOp
    label: str
    start: Callable[[], tuple[Job, Expect]] | None
    finish: Callable[[dict[str, Tensor]], T] | None
    redo: Callable[[], T]


def run_round(stages: Sequence[Stage[T]]) -> list[T]:
    """Run the stages of one op (its row shards, each on its own worker) together.

    Every job is sent before any reply is awaited, so the workers compute side by side and the
    enclave blinds and sends shard k+1 while shard k computes. Then each reply is collected, in
    order, except that workers whose last reply was slow come last (so that the others' reply times
    are measured: :class:`~tempo.enclave.pools.LinkPool`); only after all of them are in is any
    checked, so a stage redone on another worker (its own worker died, stalled, lied or sent
    garbage) can never read a reply meant for another stage.
    A stage whose worker already has a job in the round (shards that met on one worker after a
    fault) runs alone at the end.
    """
    jobs: list[tuple[Job, Expect] | Exception | None] = []
    busy: set[int] = set()
    for stage in stages:
        if stage.start is None or stage.op.worker in busy:  # one job in flight per worker: a link is
            jobs.append(None)  # not a queue (two large frames crossing each other can deadlock)
            continue
        busy.add(stage.op.worker)
        try:
            job, expect = stage.start()
            stage.op._send(job, stage.label)
            jobs.append((job, expect))
        except WORKER_FAULTS as e:
            jobs.append(e)
    replies: list[Reply | Exception | None] = [None if isinstance(sent, tuple) else sent for sent in jobs]
    for i in sorted(range(len(stages)), key=lambda i: stages[i].op.lagging()):
        if isinstance(sent := jobs[i], tuple):
            try:
                replies[i] = stages[i].op._receive(stages[i].label, sent[1])
            except WORKER_FAULTS as e:
                replies[i] = e
    for stage, reply in zip(stages, replies, strict=True):  # every worker that failed in the round is retired
        if isinstance(reply, Exception):  # before any work is redone, so that none is redone on one of them
            stage.op._retire_or_raise(reply)
    results = []
    for stage, sent, reply in zip(stages, jobs, replies, strict=True):
        if isinstance(sent, tuple) and not isinstance(reply, Exception):
            try:
                job, expect = sent
                results.append(stage.finish(stage.op._validate(reply, job, stage.label, expect)))
                continue
            except WORKER_FAULTS as e:
                reply = e
        results.append(stage.op._recover(reply, stage.redo))
    return results


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
        self._dy_sent: Tensor | None = None  # dY' of the backward in flight
        self._finalizer: weakref.finalize | None = None

    def forward_stage(self, x: Tensor, w: Tensor, *, keep_x: bool, keep_w: bool) -> Stage[Tensor]:
        """This invocation's forward as a stage of a round (:func:`run_round`): key and worker are chosen now."""
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
        return Stage(self, "forward", start=lambda: self._forward_job(x, w),
                     finish=lambda tensors: self._forward_result(tensors, x, w),
                     redo=lambda: self._submit_forward(x, w))

    def _failover(self, attempt: Callable[[], T]) -> T:
        """Run `attempt`; when its worker dies, stalls, fails, lies or speaks out of protocol, retire that
        worker and run it again
        on the next live one (same key: the new worker sees what the old one saw). Work whose worker was
        retired meanwhile (a backward whose forward ran there) moves before it is tried. A resident
        weight (key lifetime K > 1) lives on one worker, so its ops do not move; nor does work when no
        live worker is left, which raises the last error."""
        while True:
            if self.worker in self.engine.retired and self.resident is None:
                self._move()
            try:
                return attempt()
            except WORKER_FAULTS as e:
                self._retire_or_raise(e)

    def _recover(self, fault: Exception | None, redo: Callable[[], T]) -> T:
        """`redo` under failover, after `fault` (if any) retired this op's worker."""
        if fault is not None:
            self._retire_or_raise(fault)
        return self._failover(redo)

    def _retire_or_raise(self, fault: Exception) -> None:
        eng = self.engine
        if self.worker in eng.retired:  # another stage of the round already retired it
            return
        if self.resident is not None or not eng.can_replace(self.worker):
            raise fault
        eng.retire(self.worker, fault, op=self.name, step=self.step)

    def _move(self) -> None:
        """Take this op to the next live worker; what the old one kept is gone with it."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.worker = self.engine.next_worker()

    def _submit_forward(self, x: Tensor, w: Tensor) -> Tensor:
        job, expect = self._forward_job(x, w)
        return self._forward_result(self._call(job, "forward", expect), x, w)

    def _forward_job(self, x: Tensor, w: Tensor) -> tuple[Job, Expect]:
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
        self._blinded = (xb, wb)
        return job, {"y": (self.shapes.y, x.dtype)}

    def _forward_result(self, tensors: dict[str, Tensor], x: Tensor, w: Tensor) -> Tensor:
        eng, layouts = self.engine, self.kind.layouts()
        y, (xb, wb) = tensors["y"], self._blinded
        self._blinded = (None, None)
        if eng.scheme.exact:
            y = eng.scheme.unblind(y, layouts.y, Operand.Y, self.key)
            self._verify(Product.FORWARD, x, w, y)
            return y
        self._verify(Product.FORWARD, xb, wb, y)
        self._blinded = (xb if self.keep_x else None, wb if self.keep_w else None)
        return eng.scheme.unblind(y, layouts.y, Operand.Y, self.key)

    def backward_stage(self, dy: Tensor, x: Tensor, w: Tensor, *, need_dx: bool, need_dw: bool
                       ) -> Stage[tuple[Tensor | None, Tensor | None]]:
        """This invocation's backward as a stage of a round. It goes out with the others only when its
        worker still holds X' and W'; otherwise it runs alone (:meth:`_submit_backward` resends them)."""
        if self.resident is not None and self.resident.generation != self._generation:
            raise ConfigError(f"op '{self.name}': its weight '{self.resident.name}' got a new key (a later "
                              "forward began its next key period) before this forward's backward; with "
                              "key_lifetime > 1 run each backward before the next training forward")
        redo = lambda: self._submit_backward(dy, x, w, need_dx=need_dx, need_dw=need_dw)  # noqa: E731
        if self._finalizer is None or self.worker in self.engine.retired or not (need_dx or need_dw):
            return Stage(self, "backward", start=None, finish=None, redo=redo)
        return Stage(self, "backward", start=lambda: self._backward_job(dy, x, need_dx=need_dx, need_dw=need_dw),
                     finish=lambda tensors: self._backward_result(tensors, dy, x, w),
                     redo=redo)

    def _submit_backward(self, dy: Tensor, x: Tensor, w: Tensor, *, need_dx: bool, need_dw: bool
                         ) -> tuple[Tensor | None, Tensor | None]:
        if self._finalizer is None:
            # The worker no longer holds X', W': a second backward through a retained graph (it freed
            # them after the first), or a new worker after a fault. Send them again under a new handle
            # (same key) rather than keep them for every op.
            self.handle = self.engine.new_id()
            self._submit_forward(x, w)
        if not (need_dx or need_dw):
            self._finalizer.detach()
            self._finalizer = None
            self.engine.release(self.worker, self.handle)
            return None, None
        job, expect = self._backward_job(dy, x, need_dx=need_dx, need_dw=need_dw)
        return self._backward_result(self._call(job, "backward", expect), dy, x, w)

    def _backward_job(self, dy: Tensor, x: Tensor, *, need_dx: bool, need_dw: bool) -> tuple[Job, Expect]:
        self._finalizer.detach()  # the backward job itself frees the handle
        self._finalizer = None
        eng, layouts = self.engine, self.kind.layouts()
        dy = dy.to(x.dtype).contiguous()
        job = BackwardJob(job_id=eng.new_id(), handle=self.handle,
                          dy=eng.scheme.blind(dy, layouts.y, Operand.DY, self.key),
                          need_dx=need_dx, need_dw=need_dw, release=eng.take_releases(self.worker))
        self._dy_sent = job.dy
        expect = {}
        if need_dx:
            expect["dx"] = (self.shapes.x, x.dtype)
        if need_dw:
            expect["dw"] = (self.shapes.w, x.dtype)
        return job, expect

    def _backward_result(self, tensors: dict[str, Tensor], dy: Tensor, x: Tensor, w: Tensor
                         ) -> tuple[Tensor | None, Tensor | None]:
        eng = self.engine
        results = dict(tensors)
        if eng.scheme.exact:  # unblinding is exact: check in plaintext space, keep no blinded copies
            results = self._unblind_grads(results)
            dy = dy.to(x.dtype)
            operands = {"dx": (dy, w), "dw": (x, dy)}
        else:  # check what the worker computed, then unblind
            (xb, wb), self._blinded = self._blinded, (None, None)
            operands = {"dx": (self._dy_sent, wb), "dw": (xb, self._dy_sent)}
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
    def _call(self, job: Job, label: str, expect: Expect) -> dict[str, Tensor]:
        self._send(job, label)
        return self._validate(self._receive(label, expect), job, label, expect)

    def _send(self, job: Job, label: str) -> None:
        with self._timed(label):
            self.engine.pool.submit(self.worker, job)

    def _receive(self, label: str, expect: Expect) -> Reply:
        pool = self.engine.pool
        with self._timed(label):
            reply = pool.collect(self.worker, payload_bytes=expected_bytes(expect))
        self._keep_pace(label, pool.reply_seconds(self.worker))
        return reply

    def lagging(self) -> bool:
        """Whether this op's worker was slow on its last measured reply (its reply is then collected last)."""
        return self.engine.pool.pace.lagging(self.worker)

    def _keep_pace(self, label: str, seconds: float | None) -> None:
        """Retire this op's worker as 'slow' when its replies are far slower than its peers' for the same
        op (:mod:`tempo.enclave.pace`), if another live worker can take over. The reply itself still
        counts. Not for a resident weight's op: its work cannot move."""
        eng = self.engine
        if seconds is None or self.resident is not None or self.worker in eng.retired:
            return
        peers = [w for w in range(eng.pool.size) if w != self.worker and w not in eng.retired]
        why = eng.pool.pace.judge(self.worker, (self.name, label), seconds, peers)
        if why is not None and eng.can_replace(self.worker):
            eng.retire(self.worker, WorkerSlowError(f"worker {eng.pool.name(self.worker)} {why}"),
                       op=self.name, step=self.step)

    @contextmanager
    def _timed(self, label: str) -> Iterator[None]:
        """Count the time as spent on workers; name the op, product and step in a worker error."""
        start = time.perf_counter()
        try:
            yield
        except WorkerError as e:
            raise type(e)(f"op '{self.name}' ({label}) at step {self.step}: {e}") from None
        finally:
            self.engine.stats.worker_seconds += time.perf_counter() - start

    def _validate(self, reply: Reply, job: Job, label: str, expect: Expect) -> dict[str, Tensor]:
        worker = self.engine.pool.name(self.worker)
        if isinstance(reply, Failure):
            raise WorkerError(f"worker {worker} failed op '{self.name}' ({label}) at step "
                              f"{self.step}: {printable(reply.message)}")

        def lie(detail: str) -> IntegrityError:
            self.engine.stats.checks_failed += 1
            return IntegrityError(op=self.name, product=label, step=self.step, worker=worker,
                                  detail=detail)

        if not isinstance(reply, Result) or reply.job_id != job.job_id:
            raise lie(f"reply {type(reply).__name__} #{getattr(reply, 'job_id', '?')} does not answer "
                      f"job #{job.job_id}")
        if set(reply.tensors) != set(expect):
            raise lie(f"reply carries tensors {sorted(reply.tensors)}, expected {sorted(expect)}")
        for name, (shape, dtype) in expect.items():
            t = reply.tensors[name]
            if t.shape != shape or t.dtype != dtype:
                raise lie(f"result '{name}' is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
        return {name: reply.tensors[name] for name in expect}

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
