"""Load a recorded run: the workers' view, joined with the ground truth that scores attacks.

The view is every job the (colluding) workers received and every reply they sent, read from
``RECORD/view/worker-*/step-*.tr``. Forward and backward jobs of one op invocation are joined by
their handle, which the worker sees. Ops are grouped into training steps and ordered by job id;
both are things a worker can do from the traffic alone (see :mod:`tempo.wire.transcript`), and
the ground truth's step numbers are used only to name the groups. Attacks read ``OpView``;
only scoring reads ``StepTruth``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError, DatasetError, ProtocolError
from ..wire import transcript
from ..wire.messages import BackwardJob, ForwardJob, Result


@dataclass
class OpView:
    """One op invocation as the workers saw it: blinded operands and results."""

    job_id: int
    handle: int
    kind: str
    params: dict
    x: Tensor  # X'
    w: Tensor  # W'
    y: Tensor  # Y' = f(X', W')
    dy: Tensor | None = None  # dY' (None: no backward, e.g. a frozen op)
    dx: Tensor | None = None  # dX'
    dw: Tensor | None = None  # dW'


@dataclass(frozen=True)
class OpTruth:
    name: str  # qualified module name (plus function for functional products)
    kind: str
    key: dict[str, Tensor]  # scheme's key by axis role ({} for `none`); blinded[i] = plain[key[role][i]]


@dataclass(frozen=True)
class StepTruth:
    params: dict[str, Tensor]  # plaintext parameters at the start of the step
    inputs: Tensor
    labels: Tensor
    ops: dict[int, OpTruth]  # by handle


@dataclass
class Step:
    step: int
    ops: list[OpView]  # in forward order
    truth: StepTruth

    def op_truth(self, op: OpView) -> OpTruth:
        return self.truth.ops[op.handle]

    def key(self, op: OpView, role: str, n: int) -> Tensor:
        """SCORING ONLY: blinded index i along `role` (size n) holds plain index key[i]; identity where
        the scheme leaves the axis alone (everywhere for `none`).

        Under a mixing scheme (`mix`: the truth holds the dense matrix K, blinded = plain @ K along the
        axis) blinded unit i is a mixture of every plain unit: it is scored as its dominant one,
        argmax_j |K[j, i]|, so an attack that links or aligns mixtures is right only where it finds
        the same dominant unit, and chance stays 1/n.
        """
        key = self.op_truth(op).key.get(role)
        if key is None:
            return torch.arange(n)
        return key.abs().argmax(0) if key.is_floating_point() else key


@dataclass
class Transcript:
    directory: Path
    config: dict  # the run's TrainConfig as JSON
    steps: list[Step] = field(default_factory=list)

    @property
    def scheme(self) -> str:
        return self.config["scheme"]

    @property
    def key_lifetime(self) -> int:
        return int(self.config.get("key_lifetime", 1))  # recordings from before key lifetimes: 1

    @property
    def label(self) -> str:
        k = self.key_lifetime
        return f"{self.config['model']} / {self.scheme}" + (f" (key lifetime {k})" if k > 1 else "")


def load(directory: Path) -> Transcript:
    """Read RECORD (as written by ``tempo train --record RECORD``); keep steps the workers saw whole."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise DatasetError(f"{directory} is not a recording: it has no config.json "
                           "(make one with `tempo train --record DIR`)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{config_path} is not valid JSON: {e}") from None
    if not config.get("offload_anchors", True):  # recordings older than anchors offloaded every product
        raise ConfigError(f"{directory} was recorded with the first and last products kept in the enclave; the "
                          "attacks still assume every product was offloaded: record with --offload-anchors")
    ops = _read_view(directory / "view")
    truths = _read_truth(directory / "truth")
    steps = []
    for number, truth in sorted(truths.items()):
        seen = [ops[h] for h in truth.ops if h in ops]
        if seen and len(seen) == len(truth.ops):  # the first and last recorded steps may be cut
            steps.append(Step(number, sorted(seen, key=lambda op: op.job_id), truth))
    if not steps:
        raise DatasetError(f"{directory} holds no complete recorded training step")
    return Transcript(directory, config, steps)


def _read_view(view_dir: Path) -> dict[int, OpView]:
    files = sorted(view_dir.glob("worker-*/step-*.tr"))
    if not files:
        raise DatasetError(f"{view_dir} holds no worker transcripts (step-*.tr)")
    ops: dict[int, OpView] = {}
    for path in files:
        messages = list(transcript.read(path))
        if len(messages) % 2:
            raise ProtocolError(f"{path}: a job without its reply")
        for job, reply in zip(messages[::2], messages[1::2], strict=True):
            if not isinstance(reply, Result):
                continue  # a failed job carries nothing to learn from
            if isinstance(job, ForwardJob):
                ops[job.handle] = OpView(job.job_id, job.handle, job.kind, job.params, job.x, job.w,
                                         reply.tensors["y"])
            elif isinstance(job, BackwardJob) and job.handle in ops:
                op = ops[job.handle]
                op.dy, op.dx, op.dw = job.dy, reply.tensors.get("dx"), reply.tensors.get("dw")
    return ops


def _read_truth(truth_dir: Path) -> dict[int, StepTruth]:
    files = sorted(truth_dir.glob("step-*.pt"))
    if not files:
        raise DatasetError(f"{truth_dir} holds no ground truth (step-*.pt)")
    out = {}
    for path in files:
        try:
            raw = torch.load(path, weights_only=True)
            out[raw["step"]] = StepTruth(raw["params"], raw["inputs"], raw["labels"],
                                         {h: OpTruth(**op) for h, op in raw["ops"].items()})
        except (RuntimeError, KeyError, TypeError, EOFError) as e:
            raise DatasetError(f"{path} is not a ground-truth step file: {e}") from None
    return out


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
