"""``tempo predict``: batched confidential inference over a folder of images, an array or a test split."""

from __future__ import annotations

import csv
import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import ConfigError
from ..training.config import DatasetName, TrainConfig
from . import options as opts
from .errors import reported_errors
from .runtime import passive_openmp, show_warning

if TYPE_CHECKING:  # the command line loads torch only inside a command
    from torch import nn

    from ..enclave.hosting import WorkerOptions
    from ..inference.inputs import Inputs
    from ..inference.model import ModelSpec
    from ..inference.predictor import Protection

_DEFAULTS = TrainConfig()
BUILT_IN = [d.value for d in DatasetName]


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """The options that say which model to run and what it takes (shared with ``tempo serve``)."""

    arch: str | None
    model_file: Path | None
    bundle: Path | None
    keyserver: str | None
    attestation: str | None
    dev_key: Path | None
    num_classes: int | None
    input_shape: str | None
    mean: str | None
    std: str | None

    def weights(self) -> tuple[dict, str]:
        """(the state_dict, where it came from): a plain file, or a sealed model released after attestation."""
        from ..inference.model import read_state, release_sealed_state

        if (self.model_file is None) == (self.bundle is None):
            raise ConfigError("give the weights: --model-file FILE (a state_dict) or --bundle FILE (a sealed model)")
        if self.bundle is None:
            if self.keyserver or self.attestation or self.dev_key:
                raise ConfigError("--keyserver, --attestation and --dev-key go with --bundle")
            return read_state(self.model_file), str(self.model_file)
        return (release_sealed_state(self.bundle, self.keyserver, self.attestation, self.dev_key,
                                     log=lambda line: typer.echo(line, err=True)), str(self.bundle))

    def run(self) -> TrainConfig | None:
        """The settings of the training run beside --model-file (none for a sealed model: its folder's
        config.json names data that lived in enclave memory)."""
        from ..inference.model import run_config

        return run_config(self.model_file) if self.bundle is None else None

    def spec(self, data_shape: tuple[int, ...] | None = None) -> ModelSpec:
        from ..inference.model import resolve_spec

        return resolve_spec(self.arch, self.run(), num_classes=self.num_classes,
                            input_shape=None if self.input_shape is None else _shape(self.input_shape),
                            data_shape=data_shape, mean=_floats("--mean", self.mean), std=_floats("--std", self.std))


def _shape(text: str) -> tuple[int, int, int]:
    from ..training.config import parse_shape

    try:
        return parse_shape(text)
    except ConfigError:
        raise ConfigError(f"--input-shape must be C,H,W with H == W (e.g. 3,32,32), got {text!r}") from None


def _floats(option: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated numbers, one per channel, got {text!r}") from None


def predict(
    data: Annotated[str, typer.Option(
        help="What to predict on: a folder of images (ImageFolder layout: one subfolder per class, sorted; or "
             "flat), a .npy / .npz array ([N, C, H, W] or [N, H, W]; uint8 0..255 or float 0..1; a .npz may add "
             f"'labels'), or a built-in dataset's test split: {', '.join(BUILT_IN)}.")],
    model: opts.Model = None,
    model_file: opts.ModelFile = None,
    out: Annotated[Path, typer.Option(help="CSV file to write: id, prediction, then one probability per class.")
                   ] = Path("preds.csv"),
    data_dir: Annotated[Path | None, typer.Option(
        help="A built-in dataset's folder (as for `tempo train --data-dir`).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Inputs per protected forward pass.")] = 128,
    num_classes: opts.NumClasses = None,
    input_shape: opts.InputShape = None,
    mean: opts.Mean = None,
    std: opts.Std = None,
    workers: opts.Workers = _DEFAULTS.workers,
    in_process_workers: opts.InProcessWorkers = False,
    listen: opts.Listen = None,
    token_file: opts.TokenFile = None,
    worker_timeout: opts.WorkerTimeout = _DEFAULTS.worker_timeout,
    scheme: opts.Scheme = _DEFAULTS.scheme,
    checks: opts.Checks = _DEFAULTS.checks,
    offload_anchors: opts.OffloadAnchors = False,
    unfold_convs: opts.UnfoldConvs = False,
    bundle: opts.SealedModel = None,
    keyserver: opts.Keyserver = None,
    attestation: opts.Attestation = None,
    dev_key: opts.DevKey = None,
    record: Annotated[Path | None, typer.Option(
        help="Leakage suite: record the inference traffic (each batch a step: every job the workers received and "
             "their replies, in RECORD/view) and the ground truth (plaintext inputs, weights, keys, in RECORD/truth). "
             "Evaluate with `tempo attack RECORD`. Needs --offload-anchors.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Predict with a trained model, every product blinded, offloaded to the workers and verified."""
    passive_openmp()
    with reported_errors(), warnings.catch_warnings():
        warnings.showwarning = show_warning
        from ..enclave.hosting import WorkerOptions
        from ..inference.predictor import Protection

        args = ModelArgs(model, model_file, bundle, keyserver, attestation, dev_key, num_classes, input_shape,
                         mean, std)
        if not out.parent.is_dir():
            raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
        state, source = args.weights()
        spec, inputs = _inputs(args, data, data_dir)
        from ..inference.model import build_classifier

        classifier = build_classifier(spec, state, source)
        pool = WorkerOptions(workers, in_process_workers, listen, token_file, worker_timeout)
        protection = Protection(scheme, checks, offload_anchors, unfold_convs)
        typer.echo(f"predicting {len(inputs)} input(s) from {inputs.source} with {spec.describe()}: "
                   f"{pool.describe()} worker(s), scheme {scheme}, checks {checks}", err=True)
        if record is not None:
            _start_recording(record, args, spec, data, protection, batch_size)
        correct = _run(classifier, inputs, spec, pool, protection, out, batch_size, progress, record)
        if correct is not None:
            typer.echo(f"accuracy {correct / len(inputs):.2%} ({correct} of {len(inputs)} labelled inputs)")
        typer.echo(f"predictions in {out}")


def _inputs(args: ModelArgs, data: str, data_dir: Path | None) -> tuple[ModelSpec, Inputs]:
    """(the model's spec, the inputs): a built-in test split is prepared exactly as training prepared it."""
    from ..inference.inputs import Inputs, read_inputs
    from ..inference.model import training_spec

    if data in BUILT_IN:
        if args.input_shape or args.mean or args.std:
            raise ConfigError(f"--input-shape, --mean and --std do not go with --data {data}: a built-in dataset "
                              "is prepared as `tempo train` prepares it")
        run = args.run()
        if run is None and args.arch is None:
            raise ConfigError("--model is needed: no config.json next to --model-file names the architecture")
        run = run or TrainConfig(model=args.arch)
        same = run.dataset.value == data
        run = dataclasses.replace(run, dataset=DatasetName(data), test_subset=None,
                                  data_dir=data_dir or (run.data_dir if same else None),
                                  train_subset=run.train_subset if same else _DEFAULTS.train_subset)
        spec, loaded = training_spec(run, args.arch)
        if args.num_classes is not None:
            spec = dataclasses.replace(spec, num_classes=args.num_classes)
        test = loaded.test
        return spec, Inputs(test.images, [f"test-{i}" for i in range(len(test))], test.labels, None,
                            f"the {data} test split")
    if data_dir is not None:
        raise ConfigError(f"--data-dir goes with a built-in dataset ({', '.join(BUILT_IN)}), not --data {data}")
    inputs = read_inputs(Path(data))
    return args.spec(inputs.shape()), inputs


def _start_recording(record: Path, args: ModelArgs, spec: ModelSpec, data: str, protection: Protection,
                     batch_size: int) -> None:
    """RECORD/config.json: the settings `tempo attack` reads (the architecture, the scheme, and the dataset whose
    test split gives the attacker its public images)."""
    if not protection.offload_anchors:
        raise ConfigError("--record needs --offload-anchors: the suite attacks a recording of every product, and "
                          "`tempo attack --view anchors-inside` takes the anchors out again")
    run = args.run()
    if data not in BUILT_IN and run is None:
        raise ConfigError("--record needs a dataset for the attacker's public images: predict on a built-in dataset, "
                          "or with a model file whose run config.json names one")
    config = dataclasses.replace(run or TrainConfig(), model=spec.arch, scheme=protection.scheme,
                                 checks=protection.checks, offload_anchors=True, unfold_convs=protection.unfold_convs,
                                 key_lifetime=1, batch_size=batch_size, record=record,
                                 dataset=DatasetName(data) if data in BUILT_IN else run.dataset)
    record.mkdir(parents=True, exist_ok=True)
    (record / "config.json").write_text(config.to_json() + "\n")


def _run(classifier: nn.Module, inputs: Inputs, spec: ModelSpec, pool: WorkerOptions, protection: Protection,
         out: Path, batch_size: int, progress: bool, record: Path | None) -> int | None:
    """Predict every batch into OUT (written whole or not at all); the correct predictions when labels are known."""
    partial = out.with_name(out.name + ".partial")
    try:
        correct = _predict_into(partial, classifier, inputs, spec, pool, protection, batch_size, progress, record)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    return None if inputs.labels is None else correct


def _predict_into(partial: Path, classifier: nn.Module, inputs: Inputs, spec: ModelSpec, pool: WorkerOptions,
                  protection: Protection, batch_size: int, progress: bool, record: Path | None) -> int:
    from tqdm import tqdm

    from ..inference.predictor import open_predictor

    correct = 0
    with open_predictor(classifier, pool, protection, record=record) as predictor, partial.open("w", newline="") as f, \
            tqdm(total=len(inputs), desc="predicting", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        rows = csv.writer(f)
        rows.writerow(["id", "prediction", *(f"p{k}" for k in range(spec.num_classes))])
        for ids, x, labels in inputs.batches(spec, batch_size):
            probabilities = predictor.probabilities(x, labels)
            predictions = probabilities.argmax(1)
            for i, (p, row) in enumerate(zip(predictions.tolist(), probabilities.tolist(), strict=True)):
                rows.writerow([ids[i], p, *(f"{q:.6g}" for q in row)])
            if labels is not None:
                correct += int((predictions == labels).sum())
            bar.update(len(ids))
    return correct
