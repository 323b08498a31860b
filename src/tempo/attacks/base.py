"""What every attack shares: the context it runs in and the one number it reports.

An attack plays the curious worker. It may use the transcript's view (``OpView``), the public
architecture (the model's name and shapes: the worker sees the shapes anyway), and, where the
attack says so, a small auxiliary labelled set (the attacker's own data, disjoint from nothing
secret: Fashion-MNIST is public). It must not read ``StepTruth`` except to score its result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..training.config import TrainConfig
from ..training.data import LoadedData, load_data
from ..training.models import build_model
from .transcript import NotApplicable, Transcript

__all__ = ["Attack", "AttackContext", "Finding", "NotApplicable", "OpSite", "trace_sites"]


@dataclass
class Finding:
    """One attack's result on one transcript."""

    attack: str  # module name, e.g. "direct_use"
    metric: str  # what `value` measures, e.g. "test accuracy of the stolen model"
    value: float  # the headline number: higher means more was recovered
    baseline: float  # the same number for an attacker who guesses at random
    details: dict[str, Any] = field(default_factory=dict)  # per layer / per setting numbers (JSON-able)
    figures: dict[str, str] = field(default_factory=dict)  # caption -> image path relative to the report


@dataclass(frozen=True)
class OpSite:
    """Where an op of the public architecture sits: its name, kind and weight parameter (if any)."""

    name: str
    kind: str
    weight: str | None  # state_dict key of W when W is a parameter (linear, conv2d), else None


class AttackContext:
    """The transcript plus everything public an attacker may use, built lazily and shared by attacks."""

    def __init__(self, transcript: Transcript, out_dir: Path, *, seed: int = 0, aux_size: int = 600,
                 test_size: int = 2000, options: dict[str, Any] | None = None):
        self.transcript, self.out_dir, self.seed = transcript, Path(out_dir), seed
        self.aux_size, self.test_size = aux_size, test_size
        self.options = options or {}  # per-attack budgets by name, e.g. {"finetune_steps": 50} in tests
        self.config = TrainConfig(**{k: v for k, v in transcript.config.items()
                                     if k in TrainConfig.__dataclass_fields__})
        self.cache: dict[str, Any] = {}  # results one attack computes and another reuses (e.g. alignments)

    @functools.cached_property
    def data(self) -> LoadedData:
        """The run's dataset with the same preprocessing (train subset: the attacker's pool of public data)."""
        c = self.config
        return load_data(c.dataset, model=c.model, data_dir=c.data_dir, seed=c.seed + 1, train_subset=None,
                         test_subset=self.test_size, image_size=c.image_size, normalize=c.normalize,
                         synthetic_shape=c.synthetic_shape, synthetic_classes=c.synthetic_classes)

    def aux(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` labelled training images (default aux_size) the attacker is assumed to own, fixed by the seed."""
        train = self.data.train
        index = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))[:n or self.aux_size]
        images, labels = zip(*(train[int(i)] for i in index), strict=True)
        return torch.stack(images), torch.tensor(labels)

    def new_model(self, seed: int | None = None) -> nn.Module:
        """The public architecture with a fresh random initialisation."""
        torch.manual_seed(self.seed if seed is None else seed)
        d = self.data
        return build_model(self.config.model, num_classes=d.num_classes, channels=d.channels,
                           image_size=d.image_size)

    @functools.cached_property
    def sites(self) -> list[OpSite]:
        """The architecture's training ops in forward order, matched one to one with each step's ops."""
        sites = trace_sites(self.new_model(), self.data.train[0][0].unsqueeze(0).expand(2, -1, -1, -1),
                            unfold_convs=self.config.unfold_convs)
        step = self.transcript.steps[0]
        kinds = [op.kind for op in step.ops]
        if kinds != [s.kind for s in sites]:
            raise ValueError(f"the recording's ops {kinds} do not match architecture "
                             f"{self.config.model}'s {[s.kind for s in sites]}")
        return sites

    def test_accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy of `model` on the scoring test set, in eval mode."""
        from ..training.loop import evaluate

        return evaluate(model, self.data.test, torch.device("cpu"))[1]

    def figure_path(self, name: str) -> Path:
        path = self.out_dir / "figures" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def trace_sites(model: nn.Module, example: torch.Tensor, *, unfold_convs: bool = False) -> list[OpSite]:
    """Run `model` once under a recording engine with no blinding to list its ops (public structure),
    offloaded as the recording's run offloaded them."""
    import warnings

    from ..enclave.engine import protect
    from ..enclave.pools import InProcessPool

    class _Names:
        def __init__(self) -> None:
            self.ops: list[tuple[str, str]] = []

        def op(self, step: int, handle: int, name: str, kind: str, key: dict) -> None:
            self.ops.append((name, kind))

    names = _Names()
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        protected = protect(model, InProcessPool(1), scheme="none", checks=0, offload_anchors=True,  # type: ignore[arg-type]
                            unfold_convs=unfold_convs, truth=names)
    protected.train()
    with torch.enable_grad():  # attacks may first ask for the sites inside no_grad evaluation
        protected(example).sum().backward()
    return [OpSite(name, kind, f"{name}.weight" if f"{name}.weight" in params and kind in ("linear", "conv2d")
                   else None) for name, kind in names.ops]


Attack = Callable[[AttackContext], Finding]
