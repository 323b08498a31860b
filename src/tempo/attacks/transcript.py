"""Load a recorded run: the workers' view, joined with the ground truth that scores attacks.

The view is every job the (colluding) workers received and every reply they sent, read from
``RECORD/view/worker-*/step-*.tr``. Forward and backward jobs of one op invocation are joined by
their handle, which the worker sees. Ops are grouped into training steps and ordered by job id;
both are things a worker can do from the traffic alone (see :mod:`tempo.wire.transcript`), and
the ground truth's step numbers are used only to name the groups. Attacks read ``OpView``;
only scoring reads ``StepTruth``, and that is enforced: a step's truth (and every key) opens only
inside :func:`scoring`, so an attack that peeks raises :class:`TruthAccessError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, DatasetError, ProtocolError
from ..wire import transcript
from ..wire.messages import BackwardJob, ForwardJob, Result


class NotApplicable(ValueError):
    """The recording offers the attack nothing to work on (say, no convolution): reported as n/a, not as failed."""


class TruthAccessError(Exception):
    """The ground truth was read outside :func:`scoring`: a bug in an attack, never reported as its failure."""


_SCORING: ContextVar[bool] = ContextVar("tempo_attack_scoring", default=False)


@contextmanager
def scoring() -> Iterator[None]:
    """Open the ground truth (true parameters, inputs, labels, keys) for the code inside: scoring an attack's
    estimate, or a diagnostic labelled as such. Everything outside it plays the attacker, who has no truth."""
    token = _SCORING.set(True)
    try:
        yield
    finally:
        _SCORING.reset(token)


VIEWS = ("offloaded", "anchors-inside")
"""What the workers are taken to have seen of a recording made with every product offloaded:
everything, or everything but the anchors (the first and last products), which is what the
default configuration sends. Keys are fresh per invocation, so dropping the anchors' jobs from the
recording is exactly the traffic of a run that kept them inside."""


@dataclass
class OpView:
    """One op invocation as the workers saw it: blinded operands and results."""

    inside: ClassVar[bool] = False

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


_OPERANDS = frozenset(("x", "w", "y", "dy", "dx", "dw"))


@dataclass
class InsideOp:
    """An op that ran in the enclave in this view. Its place and kind are public (the architecture and
    the gap in the job sequence say so); its operands and results never reached a worker."""

    job_id: int
    handle: int
    kind: str
    params: dict
    inside: ClassVar[bool] = True

    def __getattr__(self, name: str):
        if name in _OPERANDS:
            raise NotApplicable(f"op {self.handle} ({self.kind}) ran inside the enclave: the workers never saw "
                                f"its {name}")
        raise AttributeError(name)


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
    ops: list[OpView | InsideOp]  # in forward order
    hidden_truth: StepTruth = field(repr=False)  # read it through `truth`, inside `scoring()`

    @property
    def seen(self) -> list[int]:
        """Indices of the ops the workers saw (all but those kept inside in this view)."""
        return [i for i, op in enumerate(self.ops) if not op.inside]

    @property
    def truth(self) -> StepTruth:
        """SCORING ONLY: this step's ground truth; raises outside :func:`scoring`."""
        if not _SCORING.get():
            raise TruthAccessError(f"step {self.step}'s ground truth was read outside scoring(): an attack may use "
                                   "only the workers' view and public things")
        return self.hidden_truth

    def op_truth(self, op: OpView | InsideOp) -> OpTruth:
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
    view: str = "offloaded"  # one of VIEWS

    @property
    def scheme(self) -> str:
        return self.config["scheme"]

    @property
    def key_lifetime(self) -> int:
        return int(self.config.get("key_lifetime", 1))  # recordings from before key lifetimes: 1

    @property
    def label(self) -> str:
        k = self.key_lifetime
        return (f"{self.config['model']} / {self.scheme}" + (f" (key lifetime {k})" if k > 1 else "")
                + (" (anchors inside)" if self.view == "anchors-inside" else ""))


def load(directory: Path, view: str = "offloaded") -> Transcript:
    """Read RECORD (as written by ``tempo train --record RECORD``); keep steps the workers saw whole.

    `view` "anchors-inside" withholds each step's first and last product (see VIEWS)."""
    if view not in VIEWS:
        raise ConfigError(f"unknown view {view!r}; choose from {list(VIEWS)}")
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
        raise ConfigError(f"{directory} was recorded with the first and last products kept in the enclave; record "
                          "with --offload-anchors and attack with --view anchors-inside to measure that setting")
    ops = _read_view(directory / "view")
    truths = _read_truth(directory / "truth")
    steps = []
    for number, truth in sorted(truths.items()):
        seen = [ops[h] for h in truth.ops if h in ops]
        if seen and len(seen) == len(truth.ops):  # the first and last recorded steps may be cut
            ordered: list[OpView | InsideOp] = sorted(seen, key=lambda op: op.job_id)
            if view == "anchors-inside":
                ordered = [_inside(op) if i in (0, len(ordered) - 1) else op for i, op in enumerate(ordered)]
            steps.append(Step(number, ordered, truth))
    if not steps:
        raise DatasetError(f"{directory} holds no complete recorded training step")
    return Transcript(directory, config, steps, view)


def _inside(op: OpView) -> InsideOp:
    return InsideOp(op.job_id, op.handle, op.kind, op.params)


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
