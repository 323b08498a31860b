"""What an untrusted worker does with a job: run one product on blinded operands.

The worker sees only blinded tensors and public op parameters. It keeps the blinded operands
of a forward job until that op's backward job (or a release) so the backward pass needs only
dY'. It never raises on a bad job: it answers with a Failure naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..products import ProductKind, make_kind
from ..wire.messages import BackwardJob, Failure, ForwardJob, Job, Reply, Result


def default_device() -> torch.device:
    """CUDA when present, with TF32 off so products round like float32 on the enclave's CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class _Kept:
    kind: ProductKind
    x_shape: torch.Size
    w_shape: torch.Size
    x: Tensor | None
    w: Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.w) if t is not None)


class WorkerCore:
    """Stateful job executor. One per worker; not thread-safe."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self._kept: dict[int, _Kept] = {}

    @property
    def kept_handles(self) -> int:
        return len(self._kept)

    @property
    def kept_bytes(self) -> int:
        return sum(k.nbytes for k in self._kept.values())

    def handle(self, job: Job) -> Reply:
        for h in job.release:
            self._kept.pop(h, None)
        try:
            if isinstance(job, ForwardJob):
                return Result(job.job_id, {"y": self._forward(job)})
            return Result(job.job_id, self._backward(job))
        except (ValueError, RuntimeError, KeyError) as e:
            return Failure(job.job_id, f"{type(job).__name__} failed: {e}")

    def _forward(self, job: ForwardJob) -> Tensor:
        kind = make_kind(job.kind, job.params)
        problem = kind.check_operands(job.x.shape, job.w.shape)
        if problem:
            raise ValueError(problem)
        if job.handle in self._kept:
            raise ValueError(f"handle {job.handle} is already in use")
        x, w = job.x.to(self.device), job.w.to(self.device)
        with torch.no_grad():
            y = kind.forward(x, w)
        if job.keep_x or job.keep_w:
            self._kept[job.handle] = _Kept(kind, x.shape, w.shape, x if job.keep_x else None,
                                           w if job.keep_w else None)
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
                out["dw"] = kept.kind.grad_weight(kept.x, dy, kept.w_shape).cpu()
        return out
