"""The model to run: its architecture and input format, and its weights (a state_dict file or a sealed model).

A model file is untrusted input until it loads: it is read with ``weights_only`` (no pickled code),
and must fit the architecture exactly (every key, every shape), or the error lists what does not.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DatasetError
from ..training.config import TrainConfig
from ..training.data import LoadedData, fit, load_data, to_float

SHOWN_KEYS = 5  # missing / unexpected keys named in an error, the rest counted


@dataclass(frozen=True)
class ModelSpec:
    """What the model is and the inputs it takes: enough to build it and to prepare any input for it."""

    arch: str  # as `tempo train --model` names it
    num_classes: int
    channels: int
    image_size: int  # square inputs, image_size x image_size
    mean: tuple[float, ...] | None = None  # per-channel normalisation of [0, 1] pixels (None: none)
    std: tuple[float, ...] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size, self.image_size

    def describe(self) -> str:
        norm = "normalised" if self.mean is not None else "not normalised"
        return f"{self.arch}, {self.num_classes} classes, {'x'.join(map(str, self.shape))} inputs ({norm})"

    def prepare(self, pixels: Tensor, *, what: str) -> Tensor:
        """Pixels [N, C, H, W] (uint8 0..255, or float 0..1) -> model inputs, resized as training does
        (a few pixels of zero padding, else a bilinear resize) and normalised. `what` names the inputs
        in the error when they cannot fit."""
        if pixels.dim() != 4:
            raise DatasetError(f"{what}: expected images shaped [N, C, H, W], got {list(pixels.shape)}")
        if pixels.shape[1] != self.channels:
            raise DatasetError(f"{what}: images have {pixels.shape[1]} channel(s), the model takes {self.channels} "
                               f"(inputs {'x'.join(map(str, self.shape))})")
        if min(pixels.shape[2:]) < 1:
            raise DatasetError(f"{what}: empty images {list(pixels.shape)}")
        x = to_float(pixels)
        if not torch.isfinite(x).all():
            raise DatasetError(f"{what}: inputs hold NaN or infinite values")
        if x.shape[2] != x.shape[3]:
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                align_corners=False, antialias=True)
        x = fit(x, self.image_size)
        if self.mean is not None:
            x = (x - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)
        return x


def run_config(model_file: Path | None) -> TrainConfig | None:
    """The settings of the training run that wrote `model_file` (its folder's config.json), if there are any."""
    if model_file is None:
        return None
    path = Path(model_file).parent / "config.json"
    if not path.is_file():
        return None
    try:
        fields = json.loads(path.read_text())
        ignored = {"mode", "record", "out"}  # where and how it trained: nothing to do with its model
        return TrainConfig(**{k: v for k, v in fields.items()
                              if k in TrainConfig.__dataclass_fields__ and k not in ignored})
    except (OSError, json.JSONDecodeError, TypeError, ConfigError) as e:
        raise ConfigError(f"{path} (the settings of the run that wrote {model_file}) cannot be read: {e}; "
                          "move the model file away from it, or repair it") from None


def training_spec(run: TrainConfig, arch: str | None = None) -> tuple[ModelSpec, LoadedData]:
    """The spec of a model `run` trained (its inputs prepared exactly as training prepared them), and the
    run's data, whose test split predict may use."""
    run = dataclasses.replace(run, model=arch or run.model)
    data = load_data(run.dataset, model=run.model, data_dir=run.data_dir, seed=run.seed,
                     train_subset=run.train_subset, test_subset=run.test_subset, image_size=run.image_size,
                     normalize=run.normalize, synthetic_shape=tuple(run.synthetic_shape),
                     synthetic_classes=run.synthetic_classes)
    mean, std = (tuple(data.train.mean.flatten().tolist()), tuple(data.train.std.flatten().tolist())) \
        if run.normalize else (None, None)
    return ModelSpec(run.model, data.num_classes, data.channels, data.image_size, mean, std), data


def read_state(path: Path) -> dict[str, Tensor]:
    """A state_dict saved with ``torch.save`` (``tempo train`` writes one to OUT/model.pt)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--model-file {path} does not exist" if not path.exists() else
                          f"--model-file {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ConfigError(f"cannot load --model-file {path}: {' '.join(str(e).split())[:300]} "
                          "(expected a state_dict saved with torch.save, e.g. a run's model.pt)") from None
    return _state_dict(state, str(path))


def release_sealed_state(sealed: Path, keyserver: str | None, attestation: str | None, dev_key: Path | None,
                         log: Callable[[str], None] = lambda line: None) -> dict[str, Tensor]:
    """The weights of a sealed model (``tempo train --bundle`` writes OUT/model.sealed), opened with the key
    the owner's key server releases to this enclave after attestation, as for a training bundle."""
    from ..attestation.attesters import ATTESTATION_BACKENDS, attester
    from ..attestation.release import request_key
    from ..sealed.model import open_state

    if keyserver is None:
        raise ConfigError("--bundle needs --keyserver HOST:PORT: the model's key is released only after attestation")
    if attestation is None:
        raise ConfigError(f"--bundle needs --attestation, one of {list(ATTESTATION_BACKENDS)} (dev proves nothing "
                          "about hardware)")
    if not Path(sealed).is_file():
        raise ConfigError(f"--bundle {sealed} does not exist or is not a file")
    key = request_key(keyserver, attester(attestation, dev_key=dev_key))
    log(f"model key released by {keyserver}")
    manifest, state = open_state(sealed, key)
    log(f"sealed model {sealed} (run {manifest.get('run_id')}, step {manifest.get('step')}) opened")
    return _state_dict(state, str(sealed))


def _state_dict(state: object, source: str) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ConfigError(f"{source} holds a {type(state).__name__}, not a state_dict (names -> tensors)")
    return state


def build_classifier(spec: ModelSpec, state: dict[str, Tensor], source: str) -> nn.Module:
    """`spec`'s architecture with the weights in `state`, in eval mode; ConfigError naming every mismatch."""
    from ..training.models import build_model

    model = build_model(spec.arch, num_classes=spec.num_classes, channels=spec.channels, image_size=spec.image_size)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} (the model's: {list(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    problems = [f"{label} {_some(names)}" for label, names in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if names]
    if problems:
        raise ConfigError(f"{source} does not fit {spec.describe()}: {'; '.join(problems)}. Give the --model "
                          "(and --num-classes / --input-shape) it was trained with")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _some(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN_KEYS} more" if len(names) > SHOWN_KEYS else ""
    return ", ".join(names[:SHOWN_KEYS]) + more


def resolve_spec(arch: str | None, run: TrainConfig | None, *, num_classes: int | None = None,
                 input_shape: tuple[int, int, int] | None = None, data_shape: tuple[int, ...] | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> ModelSpec:
    """What the model takes: from the run that trained it (its config.json) when there is one, else from
    the options, else from the data's shape. Options given override the run's."""
    if run is not None:
        spec, _ = training_spec(run, arch)
    else:
        if arch is None:
            raise ConfigError("--model is needed: no config.json next to --model-file names the architecture")
        shape = input_shape or data_shape
        if shape is None:
            raise ConfigError("--input-shape C,H,W is needed: no config.json next to --model-file says what "
                              "inputs the model takes")
        from ..training.data import default_image_size

        spec = ModelSpec(arch, 10, shape[0], default_image_size(arch, max(shape[1:])))
    if input_shape is not None:
        spec = dataclasses.replace(spec, channels=input_shape[0], image_size=input_shape[1])
    if num_classes is not None:
        spec = dataclasses.replace(spec, num_classes=num_classes)
    if (mean is None) != (std is None):
        raise ConfigError("--mean and --std go together")
    if mean is not None:
        if not len(mean) == len(std) == spec.channels or min(std) <= 0:
            raise ConfigError(f"--mean and --std need {spec.channels} value(s) each (one per channel), std > 0")
        spec = dataclasses.replace(spec, mean=tuple(mean), std=tuple(std))
    return spec
