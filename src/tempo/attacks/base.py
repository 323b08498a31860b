"""What every attack shares: the context it runs in and the one number it reports.

An attack plays the curious worker. It may use the transcript's view (``OpView``), the public
architecture (the model's name and shapes: the worker sees the shapes anyway), its own randomness,
and public labelled data. None of these may carry anything of the run:

* the attacker's seed is derived from the suite's ``seed`` under its own domain tag, never the run's
  seed, so its "fresh" models are not the run's initial weights;
* its public data is the dataset's *test* split, which no training step saw, less the images kept
  for scoring; its preprocessing statistics are the public pool's own;
* it reads ``StepTruth`` (and keys) only inside :func:`scoring`, which the transcript enforces.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..training.config import TrainConfig
from ..training.data import ImageDataset, load_data, to_float
from ..training.models import build_model
from .transcript import NotApplicable, Transcript, scoring

__all__ = ["Attack", "AttackContext", "Finding", "NotApplicable", "OpSite", "attacker_seed", "scoring", "trace_sites"]

SCORING_SEED = 0  # which test images are held out for scoring: the evaluator's choice, the same for every attacker


def attacker_seed(seed: int) -> int:
    """The attacker's own seed for suite seed `seed`: a 63-bit value under a domain tag of its own, so that no
    run seed a user picks (0, 1, 42, ...) can make the attacker's random models the run's initial weights."""
    digest = hashlib.sha256(b"tempo-leakage-suite-attacker/" + str(seed).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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


@dataclass(frozen=True)
class PublicData:
    """What the attacker may hold, and the images that score it: both from the dataset's test split."""

    public: ImageDataset  # the attacker's labelled data: no training step saw it, scoring never uses it
    scoring: ImageDataset  # held out to score models' test accuracy
    training_set_size: int  # how many images the run trained on (a thief's budget is a fraction of it)
    channels: int
    image_size: int
    num_classes: int


class AttackContext:
    """The transcript plus everything public an attacker may use, built lazily and shared by attacks."""

    def __init__(self, transcript: Transcript, out_dir: Path, *, seed: int = 0, aux_size: int = 600,
                 test_size: int = 2000, options: dict[str, Any] | None = None):
        self.transcript, self.out_dir = transcript, Path(out_dir)
        self.aux_size, self.test_size = aux_size, test_size
        self.options = options or {}  # per-attack budgets by name, e.g. {"finetune_steps": 50} in tests
        self.config = TrainConfig(**{k: v for k, v in transcript.config.items()
                                     if k in TrainConfig.__dataclass_fields__})
        self.seed = attacker_seed(seed)
        if self.seed == self.config.seed:
            raise ConfigError(f"suite seed {seed} gives the run's own seed; pick another")
        self.cache: dict[str, Any] = {}  # results one attack computes and another reuses (e.g. alignments)

    @functools.cached_property
    def data(self) -> PublicData:
        """The attacker's public data and the held-out scoring set, from the dataset's test split."""
        c = self.config
        raw = load_data(c.dataset, model=c.model, data_dir=c.data_dir, seed=c.seed, train_subset=c.train_subset,
                        test_subset=None, image_size=c.image_size, normalize=False,
                        synthetic_shape=c.synthetic_shape, synthetic_classes=c.synthetic_classes)
        images, labels = raw.test.images, raw.test.labels
        if len(labels) <= self.test_size + self.aux_size:
            raise ConfigError(f"the test split holds {len(labels)} images: too few for {self.test_size} scoring "
                              f"images and a public pool of at least {self.aux_size}")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SCORING_SEED))
        held, public = order[:self.test_size], order[self.test_size:]
        pixels = to_float(images[public]).transpose(0, 1).reshape(raw.channels, -1)
        mean, std = pixels.mean(1), pixels.std(1).clamp_min(1e-6)
        pool, scored = (ImageDataset(images[i], labels[i], image_size=raw.image_size, mean=mean, std=std)
                        for i in (public, held))
        return PublicData(pool, scored, len(raw.train), raw.channels, raw.image_size, raw.num_classes)

    def aux(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` labelled public images (default aux_size) the attacker owns, drawn by the attacker's seed."""
        public = self.data.public
        index = torch.randperm(len(public), generator=torch.Generator().manual_seed(self.seed))
        images, labels = zip(*(public[int(i)] for i in index[:n or self.aux_size]), strict=True)
        return torch.stack(images), torch.tensor(labels)

    def new_model(self, seed: int | None = None) -> nn.Module:
        """The public architecture with a fresh random initialisation from the attacker's seed (or `seed`)."""
        d = self.data
        torch.manual_seed(self.seed if seed is None else seed)
        return build_model(self.config.model, num_classes=d.num_classes, channels=d.channels,
                           image_size=d.image_size)

    @functools.cached_property
    def sites(self) -> list[OpSite]:
        """The architecture's training ops in forward order, matched one to one with each step's ops."""
        sites = trace_sites(self.new_model(), self.data.public[0][0].unsqueeze(0).expand(2, -1, -1, -1),
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

        return evaluate(model, self.data.scoring, torch.device("cpu"))[1]

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
