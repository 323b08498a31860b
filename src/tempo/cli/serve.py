"""``tempo serve``: confidential inference over HTTP, requests batched together on the workers."""

from __future__ import annotations

import signal
import socket
import warnings
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import ConfigError
from ..training.config import TrainConfig
from . import options as opts
from .errors import reported_errors
from .predict import ModelArgs
from .runtime import passive_openmp, show_warning

if TYPE_CHECKING:  # the command line loads torch only inside a command
    from ..enclave.hosting import WorkerOptions
    from ..inference.model import ModelSpec
    from ..inference.predictor import Protection

_DEFAULTS = TrainConfig()


def serve(
    model: opts.Model = None,
    model_file: opts.ModelFile = None,
    listen: Annotated[str, typer.Option(help="HOST:PORT to answer HTTP on.")] = "127.0.0.1:8000",
    max_batch: Annotated[int, typer.Option(
        min=1, help="Most inputs in one protected forward (and in one request).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(
        min=0, help="How long a request waits for others to share its batch.")] = 5.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body accepted, in MiB (413 beyond).")] = 32.0,
    num_classes: opts.NumClasses = None,
    input_shape: opts.InputShape = None,
    mean: opts.Mean = None,
    std: opts.Std = None,
    workers: opts.Workers = _DEFAULTS.workers,
    in_process_workers: opts.InProcessWorkers = False,
    worker_listen: Annotated[str | None, typer.Option(
        help="HOST:PORT where remote workers join (as `tempo train --listen`); default: local workers.")] = None,
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
) -> None:
    """Answer POST /predict (JSON {"inputs": [...]} or an image), GET /health and GET /metrics until SIGTERM
    or Ctrl-C; every product blinded, offloaded to the workers and verified."""
    passive_openmp()
    with reported_errors(), warnings.catch_warnings():
        warnings.showwarning = show_warning
        from ..enclave.hosting import WorkerOptions
        from ..inference.predictor import Protection

        if max_body_mb <= 0:
            raise ConfigError(f"--max-body-mb must be > 0, got {max_body_mb}")
        host, port = _address(listen)
        args = ModelArgs(model, model_file, bundle, keyserver, attestation, dev_key, num_classes, input_shape,
                         mean, std)
        state, source = args.weights()
        spec = args.spec()
        pool = WorkerOptions(workers, in_process_workers, worker_listen, token_file, worker_timeout)
        _serve(state, source, spec, pool, Protection(scheme, checks, offload_anchors, unfold_convs),
               host, port, max_batch, max_wait_ms / 1000, int(max_body_mb * (1 << 20)))


def _address(listen: str) -> tuple[str, int]:
    """HOST:PORT, checked free now: before the workers start, not after."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen must be HOST:PORT (e.g. 127.0.0.1:8000), got {listen!r}")
    try:
        with socket.create_server((host, int(port))):
            pass
    except OSError as e:
        raise ConfigError(f"cannot serve on {listen}: {e.strerror or e}") from None
    return host, int(port)


def _stop_on_sigterm() -> None:
    """SIGTERM stops the server like Ctrl-C: uvicorn finishes the requests in flight and the app stops the
    workers; before uvicorn runs (and when it hands the signal back after its shutdown) this ends the command."""
    def stop(signum: int, frame: object) -> None:
        raise typer.Exit(0)

    signal.signal(signal.SIGTERM, stop)


def _serve(state: dict, source: str, spec: ModelSpec, pool: WorkerOptions, protection: Protection, host: str,
           port: int, max_batch: int, max_wait: float, max_body: int) -> None:
    import functools

    import uvicorn

    from ..inference.batching import Batcher
    from ..inference.model import build_classifier
    from ..inference.predictor import open_predictor
    from ..inference.server import create_app

    classifier = build_classifier(spec, state, source)
    _stop_on_sigterm()
    batcher = Batcher(functools.partial(open_predictor, classifier, pool, protection), max_batch=max_batch,
                      max_wait=max_wait)
    describe = f"{spec.describe()}; {pool.describe()} worker(s), scheme {protection.scheme}, checks {protection.checks}"
    typer.echo(f"starting {describe}", err=True)
    try:
        batcher.start()
        app = create_app(batcher, spec, max_body_bytes=max_body, describe=describe)
        typer.echo(f"serving {source} on http://{host}:{port} (POST /predict, GET /health, GET /metrics)", err=True)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
        server.run()
    finally:
        batcher.stop()
        typer.echo("stopped: workers shut down", err=True)
