"""Options shared by the commands that run a protected model (train, predict, serve): declared once, so
that they read, default and validate alike everywhere. Each command gives its own default value."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# Where the workers run.
Workers = Annotated[int, typer.Option(
    min=1, help="Workers: local processes, or with --listen the remote workers to wait for.")]
InProcessWorkers = Annotated[bool, typer.Option(
    "--in-process-workers", help="Run the workers as objects in this process, not as processes.")]
Listen = Annotated[str | None, typer.Option(
    help="HOST:PORT where remote workers join (`tempo worker --connect HOST:PORT --token-file T` on each GPU "
         "host); the work starts when --workers of them have joined.")]
TokenFile = Annotated[Path | None, typer.Option(
    help="The job's secret token (at least 32 bytes), which every remote worker must prove.")]
WorkerTimeout = Annotated[float, typer.Option(help="Seconds to wait for a worker's reply.")]

# How the products are protected.
Scheme = Annotated[str, typer.Option(
    help="Blinding scheme: mix (dense mixing keys, the default), permute (cheaper, leaks the model; needed "
         "for --key-lifetime > 1), or none (INSECURE).")]
Checks = Annotated[int, typer.Option(min=0, help="Freivalds checks per product (0 disables).")]
OffloadAnchors = Annotated[bool, typer.Option(
    "--offload-anchors", help="Also offload the first product (it sees the raw inputs) and the last (its "
                              "output gradient carries the labels); by default they run in the enclave.")]
UnfoldConvs = Annotated[bool, typer.Option(
    "--unfold-convs", help="Offload convolutions unfolded (im2col): the row key then shuffles spatial positions "
                           "too, which channel keys leave in place; X' grows k²/stride²-fold.")]

# Attested key release (sealed bundles and models).
Keyserver = Annotated[str | None, typer.Option(help="HOST:PORT of the owner's `tempo keyserver`.")]
Attestation = Annotated[str | None, typer.Option(
    help="Attestation backend for --keyserver: sgx (under Gramine), tdx or sev-snp (confidential VMs, "
         "configfs-tsm), or dev (a software measurement signed with --dev-key: proves nothing about "
         "hardware). The hardware backends have not been run on hardware yet.")]
DevKey = Annotated[Path | None, typer.Option(help="Signing key of the dev backend (`tempo measure --dev-key`).")]

# The model to run (predict, serve).
Model = Annotated[str | None, typer.Option(
    help="Architecture, as `tempo train --model` names it (resnet18, small_cnn, timm:<name>). Default: the "
         "run's, from config.json next to --model-file.")]
ModelFile = Annotated[Path | None, typer.Option(
    help="The weights: a state_dict file (a run's model.pt). The run's config.json beside it, if any, gives "
         "the architecture, classes, input shape and normalisation.")]
SealedModel = Annotated[Path | None, typer.Option(
    help="A sealed model (`tempo train --bundle` writes OUT/model.sealed), opened with the key --keyserver "
         "releases after attestation.")]
NumClasses = Annotated[int | None, typer.Option(min=2, help="Classes the model outputs. Default: the run's, or 10.")]
InputShape = Annotated[str | None, typer.Option(
    help="C,H,W of the model's inputs (H == W). Default: the run's; predict: the data's.")]
Mean = Annotated[str | None, typer.Option(
    help="Per-channel means of [0, 1] pixels to normalise inputs by, comma-separated (with --std). "
         "Default: the run's training data's, when it trained normalised; otherwise none.")]
Std = Annotated[str | None, typer.Option(help="Per-channel standard deviations, comma-separated (with --mean).")]
