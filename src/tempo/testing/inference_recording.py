"""Recording inference traffic for the leakage suite (``tempo predict --record DIR``): evaluation only.

Training recordings come from the workers (:class:`~tempo.worker.recorder.RecordingCore`) and the
engine's ground truth, and both keep training traffic only: forward-only jobs are not steps. Inference
traffic is recorded here, on the enclave's side of the same boundary, in the same layout, so that
``tempo attack DIR`` reads it like a training recording: each batch is a step;
``view/worker-i/step-N.tr`` holds every job worker i received and its reply (the frames its link
carried: exactly its view), and ``truth/step-N.pt`` the batch's plaintext inputs, the weights, and
the key of every job, taken where the scheme blinds X (the engine files keys of training jobs only).
"""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path

from torch import Tensor, nn

from ..enclave.pools import WorkerPool
from ..enclave.truth import GroundTruth
from ..schemes import Operand, Scheme, get_scheme
from ..wire import transcript
from ..wire.messages import ForwardJob, Job, Reply


def key_tapped(scheme: str | Scheme, keys: dict[int, tuple[Tensor, object]]) -> Scheme:
    """`scheme`, also noting in `keys` the key of every X' it makes, by the blinded tensor's id."""
    base = type(get_scheme(scheme))

    class Tapped(base):
        def blind(self, t, layout, operand, key):
            out = super().blind(t, layout, operand, key)
            if operand is Operand.X:
                keys[id(out)] = (out, key)  # the tensor is held too, so its id is not reused meanwhile
            return out

    Tapped.__name__ = Tapped.__qualname__ = f"KeyTapped{base.__name__}"
    return Tapped()


class InferenceRecorder(WorkerPool):
    """Passes jobs to `inner`; writes each forward job and its reply to its worker's transcript for the
    current batch, and the job's key to the ground truth."""

    def __init__(self, inner: WorkerPool, directory: Path):
        super().__init__()
        self.inner, self.directory = inner, Path(directory)
        self.keys: dict[int, tuple[Tensor, object]] = {}
        self.scheme: Scheme | None = None  # set by whoever protects the model with key_tapped(..., self.keys)
        self.scope: list[str] = []  # the engine's module scope, to name ops in the truth
        self.truth = GroundTruth(self.directory / "truth")
        self.batch = 0
        self._pending: dict[int, deque[Job]] = defaultdict(deque)

    @property
    def size(self) -> int:
        return self.inner.size

    def name(self, index: int) -> str:
        return self.inner.name(index)

    def begin_batch(self, model: nn.Module, inputs: Tensor, labels: Tensor | None) -> None:
        """A new batch (a step, to the suite): its plaintext inputs, labels (-1: unknown) and the weights."""
        self.batch += 1
        self.truth.begin_step(self.batch, model.state_dict(), inputs,
                              labels if labels is not None else inputs.new_full((len(inputs),), -1).long())

    def submit(self, index: int, job: Job) -> None:
        if isinstance(job, ForwardJob):
            _, key = self.keys.pop(id(job.x))
            self.truth.op(self.batch, job.handle, self.scope[-1] if self.scope else "<model>", job.kind,
                          self.scheme.key_tensors(key))
        self._pending[index].append(job)
        self.inner.submit(index, job)

    def collect(self, index: int, **options: object) -> Reply:
        job = self._pending[index].popleft()
        reply = self.inner.collect(index, **options)  # options (a reply's expected size...) are the inner pool's
        self.stats = self.inner.stats
        if isinstance(job, ForwardJob):
            folder = self.directory / "view" / f"worker-{index}"
            folder.mkdir(parents=True, exist_ok=True)
            transcript.append(folder / f"step-{self.batch:06d}.tr", [job, reply])
        return reply

    def close(self) -> None:
        self.truth.flush()
        self.inner.close()
