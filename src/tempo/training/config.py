"""The typed configuration of one training run.

Kept free of torch imports so the command line can build and validate it before anything heavy
loads.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class Mode(str, enum.Enum):
    """Where the training step runs."""

    TEMPO = "tempo"  # protected model in this process, every product offloaded blinded to workers
    PLAIN = "plain"  # ordinary PyTorch on the best local device: the speed reference
    ENCLAVE = "enclave"  # the whole step in this process on CPU: the pure-TEE baseline


class DatasetName(str, enum.Enum):
    FASHION_MNIST = "fashion-mnist"
    CIFAR10 = "cifar10"
    SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run; written next to its metrics as ``config.json``."""

    model: str = "resnet18"
    dataset: DatasetName = DatasetName.FASHION_MNIST
    data_dir: Path | None = None  # None: the dataset's default location (Fashion-MNIST only)
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.03  # initial; cosine-decayed to 0 over the run
    mode: Mode = Mode.TEMPO
    workers: int = 2
    in_process_workers: bool = False
    scheme: str = "mix"
    checks: int = 2
    offload_anchors: bool = False  # also offload the first and last products (inputs and labels)
    unfold_convs: bool = False  # offload convolutions unfolded (im2col): positions blinded with the rows
    key_lifetime: int = 1  # training steps a weight keeps its key (K > 1: resident, updated by its worker)
    worker_timeout: float = 600.0
    seed: int = 0
    train_subset: int | None = 15_000  # None: the whole training set
    test_subset: int | None = None  # None: the whole test set
    image_size: int | None = None  # None: the dataset's native size (padded for ViTs, see data.py)
    normalize: bool = True
    synthetic_shape: tuple[int, int, int] = (3, 32, 32)
    synthetic_classes: int = 10
    out: Path | None = None  # None: runs/<timestamp>
    record: Path | None = None  # leakage suite: workers' transcripts and the run's ground truth go here
    record_steps: int = 10  # keep the last this many training steps of the recording
    record_until: int | None = None  # stop recording after this training step (None: record to the end)
    init_weights: Path | None = None  # a state_dict to start from instead of the seed's initialisation
    checkpoint_every: int = 0  # write a checkpoint every this many training steps (0: none)
    listen: str | None = None  # HOST:PORT where remote workers join (None: local workers)
    token_file: Path | None = None  # the job's secret token, which remote workers must prove
    progress: bool = True

    def __post_init__(self) -> None:
        for name, kind in (("mode", Mode), ("dataset", DatasetName)):  # accept plain strings from Python callers
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose one of "
                                  f"{[k.value for k in kind]}") from None
        for name in ("data_dir", "out", "record", "init_weights", "token_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        problems = [f"{name} must be >= {low}, got {getattr(self, name)}"
                    for name, low in (("epochs", 1), ("batch_size", 1), ("workers", 1), ("checks", 0),
                                      ("key_lifetime", 1), ("synthetic_classes", 2), ("record_steps", 1),
                                      ("checkpoint_every", 0))
                    if getattr(self, name) < low]
        problems += [f"{name} must be >= 1 (or unset), got {getattr(self, name)}"
                     for name in ("train_subset", "test_subset", "image_size", "record_until")
                     if getattr(self, name) is not None and getattr(self, name) < 1]
        problems += [f"{name} must be > 0, got {getattr(self, name)}"
                     for name in ("lr", "worker_timeout") if not getattr(self, name) > 0]
        if min(self.synthetic_shape) < 1:
            problems.append(f"synthetic_shape must be positive, got {self.synthetic_shape}")
        if self.record is not None and self.mode is not Mode.TEMPO:
            problems.append(f"--record needs --mode tempo (mode {self.mode.value} has no workers to record)")
        if self.key_lifetime > 1 and self.mode is not Mode.TEMPO:
            problems.append(f"--key-lifetime needs --mode tempo (mode {self.mode.value} blinds nothing)")
        if problems:
            raise ConfigError("invalid training settings: " + "; ".join(problems))

    def to_json(self) -> str:
        def plain(value: object) -> object:
            return value.value if isinstance(value, enum.Enum) else str(value) if isinstance(value, Path) else value

        return json.dumps({k: plain(v) for k, v in dataclasses.asdict(self).items()}, indent=2)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"C,H,W"`` -> (C, H, W) for ``--synthetic-shape``; square images only, as the models expect."""
    try:
        c, h, w = (int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--synthetic-shape must be C,H,W (three integers, e.g. 3,32,32), got {text!r}") from None
    if h != w or min(c, h, w) < 1:
        raise ConfigError(f"--synthetic-shape must be positive with H == W (e.g. 3,32,32), got {text!r}")
    return c, h, w
