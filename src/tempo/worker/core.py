"""What an untrusted worker does with a job: run one product on blinded operands.

The worker sees only blinded tensors and public op parameters. It keeps the blinded operands
of a forward job until that op's backward job (or a release) so the backward pass needs only
dY'. Resident weights (key lifetime K > 1, see :mod:`tempo.worker.resident`) stay across jobs
until replaced. It never raises on a bad job: it answers with a Failure naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..products import ProductKind, make_kind
from ..wire.messages import BackwardJob, Failure, ForwardJob, Install, Job, Reply, Result, Update
from .resident import ResidentWeight


def worker_device(name: str | torch.device | None) -> torch.device:
    """The device a worker computes on: `name`, checked, or :func:`default_device`."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {str(name)!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index is not None and device.index >= count):
            raise ConfigError(f"device {str(name)!r} is not here: this host has {count} CUDA device(s)")
        _exact_float32()
    elif device.type != "cpu":
        raise ConfigError(f"device {str(name)!r}: a worker computes on cpu or cuda")
    return device


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    if torch.cuda.is_available():
        _exact_float32()
        return torch.device("cuda")
    return torch.device("cpu")


def _exact_float32() -> None:
    """TF32 off on CUDA, so products round like float32 on the enclave's CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@dataclass
class _Kept:
    kind: ProductKind
    x_shape: torch.Size
    w_shape: torch.Size
    x: Tensor | None
    w: Tensor | None
    resident: ResidentWeight | None  # W' is this resident weight: dW' also accumulates into it

    @property
    def nbytes(self) -> int:
        kept = (self.x, None if self.resident else self.w)  # a resident W' is counted once, as resident
        return sum(t.numel() * t.element_size() for t in kept if t is not None)


class WorkerCore:
    """Stateful job executor. One per worker; not thread-safe."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = worker_device(device)
        self._kept: dict[int, _Kept] = {}
        self._resident: dict[int, ResidentWeight] = {}

    @property
    def kept_handles(self) -> int:
        return len(self._kept)

    @property
    def kept_bytes(self) -> int:
        return sum(k.nbytes for k in self._kept.values())

    @property
    def resident_bytes(self) -> int:
        return sum(r.nbytes for r in self._resident.values())

    def resident_weight(self, weight: int) -> Tensor:
        """The current W' of resident weight `weight` (KeyError if none is installed)."""
        return self._resident[weight].w

    def handle(self, job: Job) -> Reply:
        for h in getattr(job, "release", ()):
            self._kept.pop(h, None)
        try:
            if isinstance(job, ForwardJob):
                return Result(job.job_id, {"y": self._forward(job)})
            if isinstance(job, BackwardJob):
                return Result(job.job_id, self._backward(job))
            if isinstance(job, Install):
                self._resident[job.weight] = ResidentWeight(job.w.to(self.device))
            else:
                self._update(job)
            return Result(job.job_id)
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            return Failure(job.job_id, f"{type(job).__name__} failed: {e}")

    def _forward(self, job: ForwardJob) -> Tensor:
        kind = make_kind(job.kind, job.params)
        resident = None
        if job.w is None:
            resident = self._resident.get(job.weight)
            if resident is None:
                raise ValueError(f"no resident weight {job.weight} is installed")
        elif job.weight:
            raise ValueError("a forward job carries either W' or a resident weight id, not both")
        w_shape = resident.w.shape if resident else job.w.shape
        problem = kind.check_operands(job.x.shape, w_shape)
        if problem:
            raise ValueError(problem)
        if job.handle in self._kept:
            raise ValueError(f"handle {job.handle} is already in use")
        x = job.x.to(self.device)
        w = resident.w if resident else job.w.to(self.device)
        with torch.no_grad():
            y = kind.forward(x, w)
        if job.keep_x or job.keep_w:
            self._kept[job.handle] = _Kept(kind, x.shape, w.shape, x if job.keep_x else None,
                                           w if job.keep_w else None, resident)
        return y.cpu()

    def _backward(self, job: BackwardJob) -> dict[str, Tensor]:
        kept = self._kept.pop(job.handle, None)
        if kept is None:
            raise ValueError(f"no forward operands kept under handle {job.handle}")
        expected = kept.kind.output_shape(kept.x_shape, kept.w_shape)
        if job.dy.shape != expected:
            raise ValueError(f"dY' has shape {list(job.dy.shape)}, expected {list(expected)}")
        dy = job.dy.to(self.device)
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            if job.need_dx:
                if kept.w is None:
                    raise ValueError(f"dX' requested but W' was not kept for handle {job.handle}")
                out["dx"] = kept.kind.grad_input(dy, kept.w, kept.x_shape).cpu()
            if job.need_dw:
                if kept.x is None:
                    raise ValueError(f"dW' requested but X' was not kept for handle {job.handle}")
                dw = kept.kind.grad_weight(kept.x, dy, kept.w_shape)
                if kept.resident is not None:
                    kept.resident.accumulate(dw)
                out["dw"] = dw.cpu()
        return out

    def _update(self, job: Update) -> None:
        """Step every listed resident weight. A failure part-way may leave some stepped and others not:
        the enclave treats every weight of a failed update as lost and installs it afresh."""
        weights = []
        for entry in job.entries:
            weight = entry.get("weight") if isinstance(entry, dict) else None
            if not isinstance(weight, int) or weight not in self._resident:
                raise ValueError(f"update entry {entry!r:.80} names no installed resident weight")
            weights.append((self._resident[weight], entry, weight))
        with torch.no_grad():
            for resident, entry, weight in weights:
                resident.update(job.optimizer, entry, job.tensors, weight)
