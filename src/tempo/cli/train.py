"""``tempo train``: train a torchvision / timm model on an image dataset, protected or not."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from ..training.config import DatasetName, Mode, TrainConfig, parse_shape
from . import options as opts
from .errors import reported_errors
from .runtime import passive_openmp, show_warning

_DEFAULTS = TrainConfig()


def train(
    model: Annotated[str, typer.Option(help="torchvision name (resnet18, vit_b_16) or timm name "
                                            "(vit_tiny_patch16_224, timm:<name>).")] = _DEFAULTS.model,
    dataset: Annotated[DatasetName, typer.Option(help="Dataset to train on.")] = _DEFAULTS.dataset,
    data_dir: Annotated[Path | None, typer.Option(
        help="Dataset folder: Fashion-MNIST's *-ubyte.gz files (default /usr/share/datasets/fashion-mnist) "
             "or CIFAR-10's cifar-10-batches-py.")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = _DEFAULTS.epochs,
    batch_size: Annotated[int, typer.Option(min=1)] = _DEFAULTS.batch_size,
    lr: Annotated[float, typer.Option(help="Initial SGD learning rate (momentum 0.9), cosine-decayed to 0.")
                  ] = _DEFAULTS.lr,
    mode: Annotated[Mode, typer.Option(
        help="tempo: protected, products offloaded to workers; plain: ordinary PyTorch (CUDA if available); "
             "enclave: everything in this process on CPU.")] = _DEFAULTS.mode,
    workers: opts.Workers = _DEFAULTS.workers,
    in_process_workers: opts.InProcessWorkers = False,
    listen: opts.Listen = None,
    token_file: opts.TokenFile = None,
    scheme: opts.Scheme = _DEFAULTS.scheme,
    checks: opts.Checks = _DEFAULTS.checks,
    offload_anchors: opts.OffloadAnchors = False,
    unfold_convs: opts.UnfoldConvs = False,
    key_lifetime: Annotated[int, typer.Option(
        min=1, help="Training steps each weight keeps its key. 1: fresh keys for every product. K > 1: each "
                    "worker keeps its blinded weights and repeats the optimizer step on them, which saves "
                    "sending them every step but shows a worker one weight under one key for K steps.")
                            ] = _DEFAULTS.key_lifetime,
    worker_timeout: opts.WorkerTimeout = _DEFAULTS.worker_timeout,
    seed: Annotated[int, typer.Option(help="Fixes initial weights, data order and subsets.")] = _DEFAULTS.seed,
    out: Annotated[Path | None, typer.Option(help="Folder for metrics and model.pt [default: runs/<timestamp>]")
                   ] = None,
    train_subset: Annotated[int, typer.Option(
        min=0, help="Train on this many images drawn by the seed (0: all). Synthetic: how many to make.")
                            ] = _DEFAULTS.train_subset or 0,
    test_subset: Annotated[int, typer.Option(min=0, help="Test on this many images (0: all).")] = 0,
    image_size: Annotated[int, typer.Option(
        min=0, help="Pad or resize images to this size (0: the dataset's own, rounded up to 16 for ViTs).")] = 0,
    normalize: Annotated[bool, typer.Option(help="Normalise each channel by the training set's mean and std.")
                         ] = _DEFAULTS.normalize,
    synthetic_shape: Annotated[str, typer.Option(help="C,H,W of synthetic images.")] = "3,32,32",
    synthetic_classes: Annotated[int, typer.Option(min=2)] = _DEFAULTS.synthetic_classes,
    record: Annotated[Path | None, typer.Option(
        help="Leakage suite: every worker also saves what it received and returned to RECORD/view, and the "
             "enclave writes the ground truth (plaintext weights, inputs, keys) to RECORD/truth. "
             "Evaluate with `tempo attack RECORD`.")] = None,
    record_steps: Annotated[int, typer.Option(min=1, help="Keep the last this many recorded training steps.")
                            ] = _DEFAULTS.record_steps,
    record_until: Annotated[int, typer.Option(
        min=0, help="Record nothing after this training step (0: to the end). Weights barely move at the end "
                    "of a decayed schedule, so a mid-run window is the harder test for linking attacks.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    checkpoint_every: Annotated[int, typer.Option(
        min=0, help="Write a checkpoint every this many steps to OUT/checkpoints (sealed with --bundle); "
                    "the newest 3 are kept. 0: none.")] = 0,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out from its newest checkpoint, to the same final model.")] = False,
    resume_step: Annotated[int | None, typer.Option(
        min=1, help="With --resume: start from this step's checkpoint instead of the newest (e.g. when the "
                    "newest is refused as tampered).")] = None,
    bundle: Annotated[Path | None, typer.Option(
        help="Train from a sealed bundle (`tempo seal`): its dataset and settings, opened with the data key "
             "that --keyserver releases after attestation; the final model is written sealed.")] = None,
    keyserver: opts.Keyserver = None,
    attestation: opts.Attestation = None,
    dev_key: opts.DevKey = None,
) -> None:
    """Train a model; write per-step and per-epoch metrics, config.json and model.pt to --out."""
    if mode is Mode.TEMPO:
        passive_openmp()
    with reported_errors(), warnings.catch_warnings():
        warnings.showwarning = show_warning
        from ..training.loop import train as run

        config = TrainConfig(
            model=model, dataset=dataset, data_dir=data_dir, epochs=epochs, batch_size=batch_size, lr=lr,
            mode=mode, workers=workers, in_process_workers=in_process_workers, scheme=scheme, checks=checks,
            key_lifetime=key_lifetime, offload_anchors=offload_anchors, unfold_convs=unfold_convs,
            worker_timeout=worker_timeout, seed=seed, out=out, train_subset=train_subset or None,
            test_subset=test_subset or None, image_size=image_size or None, normalize=normalize,
            synthetic_shape=parse_shape(synthetic_shape), synthetic_classes=synthetic_classes,
            record=record, record_steps=record_steps, record_until=record_until or None, progress=progress,
            checkpoint_every=checkpoint_every, listen=listen, token_file=token_file)
        if resume_step is not None and not resume:
            raise ConfigError("--resume-step goes with --resume")
        if resume and out is None:
            raise ConfigError("--resume needs --out: the folder of the run to continue")
        if bundle is None:
            if keyserver or attestation or dev_key:
                raise ConfigError("--keyserver, --attestation and --dev-key go with --bundle")
            run(config, resume=resume, resume_step=resume_step)
        else:
            _train_from_bundle(config, bundle, keyserver, attestation, dev_key, resume, resume_step)


_OPERATIONAL = ("workers", "in_process_workers", "worker_timeout", "out", "progress",
                "checkpoint_every", "listen", "token_file")  # the host's choices, not the run's


def _train_from_bundle(cli: TrainConfig, bundle: Path, keyserver: str | None, attestation: str | None,
                       dev_key: Path | None, resume: bool, resume_step: int | None) -> None:
    """The run the owner sealed: settings from the bundle (only where-and-how options from the command
    line), data in enclave memory, the final model sealed under the owner's key."""
    import dataclasses

    from ..attestation.attesters import ATTESTATION_BACKENDS, attester
    from ..attestation.ledger import LedgerClient
    from ..enclave.provision import provisioned
    from ..sealed.checkpoints import SealedCheckpoints
    from ..sealed.metrics import SealedRunFiles
    from ..sealed.model import seal_state
    from ..training.loop import train as run
    from ..training.metrics import new_run_dir

    given = [f.name for f in dataclasses.fields(TrainConfig)
             if f.name not in _OPERATIONAL and getattr(cli, f.name) != getattr(_DEFAULTS, f.name)]
    if given:
        raise ConfigError(f"with --bundle the run's settings come from the bundle; drop {given}")
    if keyserver is None:
        raise ConfigError("--bundle needs --keyserver HOST:PORT: the data key is released only after attestation")
    if attestation is None:
        raise ConfigError(f"--bundle needs --attestation, one of {list(ATTESTATION_BACKENDS)} (dev proves nothing "
                          "about hardware)")
    evidence_source = attester(attestation, dev_key=dev_key)
    with provisioned(bundle, keyserver, evidence_source, log=lambda line: typer.echo(line, err=True)) as p:
        sealed = set(p.config) & set(_OPERATIONAL)
        if sealed:
            raise ConfigError(f"the bundle's settings name host options {sorted(sealed)}; seal it without them")
        try:
            config = TrainConfig(**p.config, data_dir=p.data_dir, init_weights=p.init_weights,
                                 **{name: getattr(cli, name) for name in _OPERATIONAL})
        except TypeError as e:
            raise ConfigError(f"the bundle's settings do not fit this Tempo: {e}") from None
        checkpoints = SealedCheckpoints(new_run_dir(config.out) / "checkpoints", p.data_key, p.run_id,
                                        LedgerClient(keyserver, p.data_key, p.run_id))
        out = checkpoints.folder.parent
        run(dataclasses.replace(config, out=out), resume=resume, resume_step=resume_step, checkpoints=checkpoints,
            files=SealedRunFiles(out, p.data_key, p.run_id),
            save_model=lambda state, out_dir, step: seal_state(state, out_dir / "model.sealed", p.data_key,
                                                               run_id=p.run_id, step=step))
