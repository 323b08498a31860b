"""One training run, the same in every mode: only where the step runs changes.

``tempo`` protects the model over local workers, ``plain`` runs ordinary PyTorch on the best
local device, ``enclave`` runs everything in this process on CPU (the pure-TEE baseline). The
seed fixes the initial weights and the data order, so the modes can be compared step by step.

The optimiser is SGD with momentum 0.9, its learning rate decayed from ``lr`` to zero along a
cosine over the run's steps: on the short runs that fit a CPU enclave this ends about one point
of test accuracy higher than a constant rate (ResNet-18 on Fashion-MNIST, 2 x 15k images).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..enclave.hosting import WorkerOptions, open_workers
from ..enclave.pools import WorkerPool
from ..errors import ConfigError, IntegrityError, ProtocolError, WorkerError
from .checkpoints import CheckpointStore, PlainCheckpoints
from .config import Mode, TrainConfig
from .data import LoadedData, load_data
from .metrics import EPOCH_FIELDS, FAULT_FIELDS, STEP_FIELDS, MetricsTable, RunFiles, new_run_dir
from .models import build_model

EVAL_BATCH_SIZE = 500  # no gradients are kept, so large batches only save round trips

Traffic = Callable[[], tuple[int, int]]  # (bytes sent, bytes received) so far


@dataclass(frozen=True)
class RunResult:
    out_dir: Path
    steps: list[dict]
    epochs: list[dict]
    seconds: float

    @property
    def test_accuracy(self) -> float:
        return self.epochs[-1]["test_accuracy"]


@contextmanager
def _placement(config: TrainConfig, model: nn.Module) -> Iterator[tuple[nn.Module, torch.device, Traffic]]:
    """The network to train (the model, or its protected wrapper), its input device and its traffic."""
    if config.mode is Mode.TEMPO:
        import tempo

        from ..enclave.truth import GroundTruth

        record = config.record
        truth = None if record is None else GroundTruth(record / "truth", keep_steps=config.record_steps,
                                                        until=config.record_until)
        with _workers(config) as pool:
            protected = tempo.protect(model, pool, scheme=config.scheme, checks=config.checks,
                                      key_lifetime=config.key_lifetime, offload_anchors=config.offload_anchors,
                                      unfold_convs=config.unfold_convs,
                                      truth=truth)
            yield protected, torch.device("cpu"), lambda: (pool.stats.bytes_sent, pool.stats.bytes_received)
        if truth is not None:
            truth.flush()
        return
    device = torch.device("cuda" if config.mode is Mode.PLAIN and torch.cuda.is_available() else "cpu")
    yield model.to(device), device, lambda: (0, 0)


def _workers(config: TrainConfig) -> WorkerPool:
    """The run's worker pool: remote workers joining on ``config.listen``, else local ones."""
    return open_workers(worker_options(config), record=None if config.record is None else config.record / "view",
                        record_steps=config.record_steps, record_until=config.record_until)


def worker_options(config: TrainConfig) -> WorkerOptions:
    return WorkerOptions(config.workers, config.in_process_workers, config.listen, config.token_file,
                         config.worker_timeout)


def describe(config: TrainConfig, data: LoadedData) -> str:
    where = {Mode.PLAIN: "plain PyTorch", Mode.ENCLAVE: "enclave-only (CPU, no workers)",
             Mode.TEMPO: f"tempo mode, {worker_options(config).describe()} worker(s), "
                         f"scheme {config.scheme}, checks {config.checks}, key lifetime {config.key_lifetime}"
             }[config.mode]
    return (f"training {config.model} on {config.dataset.value} ({len(data.train)} train / {len(data.test)} test "
            f"images, {data.channels}x{data.image_size}x{data.image_size}) for {config.epochs} epoch(s), "
            f"batch {config.batch_size}, lr {config.lr} (cosine), seed {config.seed}: {where}")


def save_plain(state: dict[str, Tensor], out_dir: Path, step: int) -> Path:
    """The final model as an ordinary state_dict file, ``model.pt``."""
    torch.save(state, out_dir / "model.pt")
    return out_dir / "model.pt"


def train(config: TrainConfig, *, log: Callable[[str], None] = print,
          save_model: Callable[[dict[str, Tensor], Path, int], Path] = save_plain,
          checkpoints: CheckpointStore | None = None, resume: bool = False, resume_step: int | None = None,
          files: RunFiles | None = None) -> RunResult:
    """Run `config` to the end; write metrics, config and the final model (through `save_model`, which
    gets the state_dict, the run folder and the step count); return the metrics.

    With ``config.checkpoint_every`` a checkpoint goes to `checkpoints` (default: plain files in the
    run folder's ``checkpoints/``) every that many steps. `resume` continues the run in ``config.out``
    from its newest checkpoint (or `resume_step`'s), to the same end as a run never stopped.
    `files` says where settings and metrics go (default: plain files in the run folder); if it is
    confidential, neither the log nor the progress bar shows them.
    """
    if config.mode is Mode.TEMPO:
        from ..schemes import get_scheme

        get_scheme(config.scheme)  # refuse a bad name before any data is read or worker started
    if resume and config.out is None:
        raise ConfigError("--resume needs --out: the folder of the run to continue")
    data = load_data(config.dataset, model=config.model, data_dir=config.data_dir, seed=config.seed,
                     train_subset=config.train_subset, test_subset=config.test_subset,
                     image_size=config.image_size, normalize=config.normalize,
                     synthetic_shape=config.synthetic_shape, synthetic_classes=config.synthetic_classes)
    if len(data.train) < config.batch_size:
        raise ConfigError(f"batch size {config.batch_size} exceeds the {len(data.train)} training images; "
                          "lower --batch-size or raise --train-subset")
    torch.manual_seed(config.seed)  # same initial weights in every mode
    model = build_model(config.model, num_classes=data.num_classes, channels=data.channels,
                        image_size=data.image_size)
    if config.init_weights is not None:
        _load_initial(model, config.init_weights)
    out_dir = new_run_dir(config.out)
    store = checkpoints or PlainCheckpoints(out_dir / "checkpoints")
    files = files or RunFiles(out_dir)
    resumed = _resumable(config, files, store, resume_step) if resume else None
    if not resume:
        store.begin()
    files.write_config(config.to_json())
    if config.record is not None:
        config.record.mkdir(parents=True, exist_ok=True)
        (config.record / "config.json").write_text(config.to_json() + "\n")
    private_log = (lambda _: None) if files.confidential else log  # settings and metrics: the owner's only
    if files.confidential:
        log(f"settings and metrics are sealed into {files.where} (`tempo unseal` opens them on the owner's machine); "
            "the terminal, which the host sees, shows progress only")
    private_log(describe(config, data))
    start = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(files)  # saved last, also on an error
        steps = stack.enter_context(files.table("steps", STEP_FIELDS, resumed["steps"] if resumed else ()))
        epochs = stack.enter_context(files.table("epochs", EPOCH_FIELDS, resumed["epochs"] if resumed else ()))
        net, device, traffic = stack.enter_context(_placement(config, model))
        generator = torch.Generator().manual_seed(config.seed)
        loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, drop_last=True,
                            generator=generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(loader))
        position = _Position(epoch=1)
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            schedule.load_state_dict(resumed["schedule"])
            torch.set_rng_state(resumed["torch_rng"])
            position = _Position(**resumed["position"])
            log(f"resumed from the checkpoint of step {resumed['step']} (epoch {position.epoch}, "
                f"{position.batch} of {len(loader)} batches done)")

        def checkpoint(step: int, *, now: bool = False, rng: Tensor | None = None) -> Path | None:
            """Every checkpoint_every steps, or `now` (the run is about to stop: no worker left)."""
            if now or (config.checkpoint_every and step % config.checkpoint_every == 0):
                files.save()
                return store.save({"step": step, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                   "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                   "torch_rng": torch.get_rng_state() if rng is None else rng,
                                   "position": dataclasses.asdict(position), "steps": steps.rows,
                                   "epochs": epochs.rows, "faults": faults.rows}, step)
            return None

        faults = stack.enter_context(files.table("faults", FAULT_FIELDS, resumed.get("faults", ()) if resumed else ()))
        trainer = _Trainer(net, device, optimizer, schedule, traffic, faults, show_metrics=not files.confidential)
        for epoch in range(position.epoch, config.epochs + 1):
            if position.batch == 0:
                position.loader_rng = generator.get_state()  # this epoch's order, as a resumed run redraws it
            else:
                generator.set_state(position.loader_rng)
            epoch_start = time.perf_counter()
            train_loss, train_acc = trainer.epoch(loader, steps, epoch, config, position, checkpoint)
            eval_start = time.perf_counter()
            test_loss, test_acc = evaluate(net, data.test, device, progress=config.progress)
            epochs.add({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                        "test_loss": test_loss, "test_accuracy": test_acc,
                        "epoch_time_s": eval_start - epoch_start, "eval_time_s": time.perf_counter() - eval_start})
            files.save()
            private_log(f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f} acc {train_acc:.2%}, "
                        f"test loss {test_loss:.4f} acc {test_acc:.2%}")
            position = _Position(epoch=epoch + 1)
    saved = save_model({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir,
                       config.epochs * len(loader))
    result = RunResult(out_dir, steps.rows, epochs.rows, time.perf_counter() - start)
    summary = "" if files.confidential else (
        f" test accuracy {result.test_accuracy:.2%} (test loss {epochs.rows[-1]['test_loss']:.4f}) after "
        f"{config.epochs} epoch(s) in {result.seconds:.1f} s, mode {config.mode.value};")
    log(f"done:{summary} metrics in {files.where}, model in {saved}")
    return result


# where and how a run executes, not what it computes
_RESUME_FREE = ("out", "progress", "workers", "in_process_workers", "worker_timeout", "checkpoint_every",
                "data_dir", "init_weights", "listen", "token_file")


def _resumable(config: TrainConfig, files: RunFiles, store: CheckpointStore, step: int | None) -> dict:
    """The checkpoint to resume from, after checking that `files` hold a run of these same settings."""
    before = files.read_config()
    now = json.loads(config.to_json())
    changed = sorted(k for k in now if k not in _RESUME_FREE and before.get(k) != now[k])
    if changed:
        raise ConfigError(f"the run in {files.out_dir} had other settings: {changed} differ; resume with the same ones")
    return store.resume(step)


@dataclass
class _Position:
    """Where a run is: the epoch, batches done in it, their running sums, and the epoch's data order."""

    epoch: int
    batch: int = 0
    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    loader_rng: Tensor | None = None  # the loader generator's state at the epoch's start


def _load_initial(model: nn.Module, path: Path) -> None:
    """Start from the state_dict at `path`; every key must match the architecture exactly."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"cannot load initial weights {path}: {e}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"initial weights {path} hold a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"initial weights {path} do not fit model: {' '.join(str(e).split())[:400]}") from None


@dataclass
class _Trainer:
    """What a training step needs: the network, its input device, optimiser, schedule and traffic meter."""

    net: nn.Module
    device: torch.device
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    traffic: Traffic
    faults: MetricsTable  # every worker fault: who, which op, which step, what kind
    show_metrics: bool = True  # False: the progress bar shows steps and img/s only (the host sees it)
    _logged: int = 0  # faults of this process's engine already in the table
    updating: bool = False  # inside the optimizer step: a failure now leaves no consistent state

    def _log_faults(self) -> None:
        engine = getattr(self.net, "engine", None)
        if engine is not None:
            for fault in engine.faults[self._logged:]:
                self.faults.add(fault)
            self._logged = len(engine.faults)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """One SGD step; the batch's loss and number of correct predictions (before the update)."""
        x, y = x.to(self.device), y.to(self.device)
        engine = getattr(self.net, "engine", None)
        if engine is not None and engine.truth is not None:
            engine.truth.begin_step(engine.step + 1, self.net.module.state_dict(), x, y)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            self.updating = True
            self.optimizer.step()
            self.schedule.step()
            self.updating = False
        finally:
            self._log_faults()  # also when a fault ends the run
        return loss.item(), int((logits.argmax(1) == y).sum())

    def epoch(self, loader: DataLoader, steps: MetricsTable, epoch: int, config: TrainConfig, position: _Position,
              checkpoint: Callable[..., Path | None]) -> tuple[float, float]:
        """Mean loss and accuracy over the epoch's batches; one metrics row per step; `checkpoint` after each.

        Batches before ``position.batch`` were trained before the checkpoint this run resumed from:
        they are drawn (so the order matches) and skipped."""
        self.net.train()
        with tqdm(total=len(loader) * config.batch_size, initial=position.batch * config.batch_size,
                  desc=f"epoch {epoch}/{config.epochs}", unit="img", disable=not config.progress,
                  dynamic_ncols=True) as bar:
            for index, (x, y) in enumerate(loader):
                if index < position.batch:
                    continue
                start, (sent, received), rng = time.perf_counter(), self.traffic(), torch.get_rng_state()
                try:
                    batch_loss, batch_correct = self.step(x, y)
                except (WorkerError, IntegrityError, ProtocolError) as e:
                    if self.updating:  # the optimizer was part-way: this state is no step's
                        raise
                    saved = checkpoint(len(steps.rows), now=True, rng=rng)
                    raise WorkerError(f"no worker can take over: {e} The last completed step ({len(steps.rows)}) "
                                      f"is checkpointed in {saved}: continue with --resume once workers are back"
                                      ) from None
                elapsed, (now_sent, now_received) = time.perf_counter() - start, self.traffic()
                steps.add({"step": len(steps.rows) + 1, "epoch": epoch, "loss": batch_loss,
                           "accuracy": batch_correct / len(y), "step_time_s": elapsed,
                           "bytes_sent": now_sent - sent, "bytes_received": now_received - received})
                position.batch += 1
                position.seen += len(y)
                position.correct += batch_correct
                position.loss_sum += batch_loss * len(y)
                checkpoint(len(steps.rows))
                bar.update(len(y))
                if self.show_metrics:
                    bar.set_postfix(loss=f"{position.loss_sum / position.seen:.4f}",
                                    acc=f"{position.correct / position.seen:.2%}", refresh=False)
        return position.loss_sum / position.seen, position.correct / position.seen


@torch.no_grad()
def evaluate(net: nn.Module, dataset: Dataset, device: torch.device, *, progress: bool = False
             ) -> tuple[float, float]:
    """Mean loss and accuracy on `dataset` in eval mode (batch-norm statistics frozen)."""
    net.eval()
    seen = correct = 0
    loss_sum = 0.0
    loader = DataLoader(dataset, batch_size=EVAL_BATCH_SIZE)
    with tqdm(total=len(dataset), desc="  test", unit="img", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = net(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(len(y))
    return loss_sum / seen, correct / seen
