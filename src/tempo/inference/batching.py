"""Dynamic batching: concurrent requests joined into one protected forward, on the one thread that owns
the protected model and its workers.

A pool is driven by one thread at a time (jobs and replies are matched in order per link), and a
forward's blinding costs the enclave about the same for 1 input as for 32 of them, so requests wait
up to `max_wait` seconds for others to share their batch (up to `max_batch` inputs). A worker that
dies, stalls or lies is retired by the engine and its products rerun on another worker: the
request is still answered, and the fault shows in :attr:`Batcher.faults`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from .predictor import Predictor

_STOP = object()


@dataclass
class _Request:
    x: Tensor  # prepared inputs [n, C, H, W]
    answer: Future  # set to the probabilities [n, classes], or to the error


class Batcher:
    """Owns a :class:`Predictor` (made by `open_predictor`, a context manager, on this thread) and runs every
    batch; :meth:`submit` may be called from any thread."""

    def __init__(self, open_predictor: Callable, *, max_batch: int, max_wait: float):
        self._open, self.max_batch, self.max_wait = open_predictor, max_batch, max_wait
        self._queue: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._lock = threading.Lock()  # guards the counters below
        self.batch_sizes: Counter[int] = Counter()
        self.faults: list[dict] = []
        self.workers: list[dict] = []  # name and liveness of each worker
        self._thread = threading.Thread(target=self._run, name="tempo-batcher", daemon=True)

    def start(self) -> None:
        """Start the thread and wait until the workers have joined; raise what kept them from it."""
        self._thread.start()
        while not self._ready.wait(0.1):
            if not self._thread.is_alive():
                break
        if self._startup_error is not None:
            raise self._startup_error

    def submit(self, x: Tensor) -> Future:
        """Queue prepared inputs; the future gets their class probabilities."""
        answer: Future = Future()
        if not self._thread.is_alive():
            answer.set_exception(RuntimeError("the model is not running"))
        else:
            self._queue.put(_Request(x, answer))
        return answer

    def stop(self) -> None:
        """Finish the queued requests, stop the workers and the thread (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        try:
            with self._open() as predictor:
                self._note(predictor)
                self._ready.set()
                while (batch := self._next_batch()) is not None:
                    self._answer(predictor, batch)
        except BaseException as e:  # startup failed, or the pool could not be closed: tell whoever waits
            self._startup_error = e
        finally:
            self._ready.set()
            self._fail_queued(RuntimeError("the model stopped"))

    def _next_batch(self) -> list[_Request] | None:
        """The oldest request and those that arrive within max_wait of it, up to max_batch inputs; None: stop."""
        first = self._queue.get()
        if first is _STOP:
            return None
        batch, size, deadline = [first], len(first.x), time.monotonic() + self.max_wait
        while size < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if nxt is _STOP or size + len(nxt.x) > self.max_batch:
                self._queue.put(nxt)  # the next batch's (or the stop, after this batch)
                break
            batch.append(nxt)
            size += len(nxt.x)
        return batch

    def _answer(self, predictor: Predictor, batch: list[_Request]) -> None:
        try:
            probabilities = predictor.probabilities(torch.cat([r.x for r in batch]))
        except Exception as e:  # no worker left, or the model failed on these inputs: every request hears it
            for r in batch:
                r.answer.set_exception(e)
        else:
            for r, p in zip(batch, probabilities.split([len(r.x) for r in batch]), strict=True):
                r.answer.set_result(p)
        finally:
            with self._lock:
                self.batch_sizes[sum(len(r.x) for r in batch)] += 1
            self._note(predictor)

    def _note(self, predictor: Predictor) -> None:
        pool, retired = predictor.pool, predictor.model.engine.retired
        with self._lock:
            self.faults = list(predictor.faults)
            self.workers = [{"name": pool.name(i), "live": i not in retired} for i in range(pool.size)]

    def _fail_queued(self, error: Exception) -> None:
        while True:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                return
            if r is not _STOP:
                r.answer.set_exception(error)

    def snapshot(self) -> dict:
        with self._lock:
            return {"batches": sum(self.batch_sizes.values()),
                    "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "worker_faults": list(self.faults), "workers": list(self.workers)}
