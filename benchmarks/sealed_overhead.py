"""What sealing costs a training run: opening the bundle, and sealing checkpoints, next to an epoch.

A bundle run authenticates and decrypts its bundle once, into enclave memory, before the first
step (``tempo.enclave.provision``); the epochs then read plaintext from memory, so the bundle adds
its decryption time once per run, not a per-batch cost. Sealed checkpoints add their sealing time
every ``--checkpoint-every`` steps. This script measures, in one run, side by side:

- sealing and opening (authenticate + decrypt + write to /dev/shm) the Fashion-MNIST folder;
- one training epoch of ``--model`` in tempo mode (one in-process worker);
- writing that run's checkpoint state plain (``torch.save``) and sealed.

Usage::

    python benchmarks/sealed_overhead.py                        # resnet18, 3,000 images, batch 128
    python benchmarks/sealed_overhead.py --train-subset 15000   # the default run's epoch
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tempo.sealed.bundle import OpenBundle, seal_bundle
from tempo.sealed.model import CHECKPOINT, seal_state
from tempo.sealed.stream import new_data_key
from tempo.training.config import DEFAULT_FASHION_MNIST_DIR, TrainConfig
from tempo.training.loop import train


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--train-subset", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    key = new_data_key()
    memory = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory() as work, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work = Path(work)
        data_bytes = sum(p.stat().st_size for p in DEFAULT_FASHION_MNIST_DIR.iterdir())
        bundle = work / "fmnist.sealed"

        def seal() -> None:
            bundle.unlink(missing_ok=True)
            seal_bundle(DEFAULT_FASHION_MNIST_DIR, {"model": args.model}, bundle, key)

        def open_bundle() -> None:
            with OpenBundle(bundle, key) as opened, tempfile.TemporaryDirectory(dir=memory) as d:
                opened.extract(Path(d))

        seal_s, open_s = _median_seconds(seal, args.repeats), _median_seconds(open_bundle, args.repeats)
        run = train(TrainConfig(model=args.model, epochs=1, train_subset=args.train_subset, test_subset=500,
                                batch_size=args.batch_size, workers=1, in_process_workers=True, progress=False,
                                out=work / "run"), log=lambda _: None)
        epoch_s = run.epochs[0]["epoch_time_s"]
        steps = len(run.steps)
        model = torch.load(run.out_dir / "model.pt", weights_only=True)
        state = {"step": steps, "model": model, "optimizer": {k: v.clone() for k, v in model.items()}}  # + momentum
        plain_s = _median_seconds(lambda: torch.save(state, work / "plain.pt"), args.repeats)
        sealed_s = _median_seconds(lambda: seal_state(state, work / "c.sealed", key, run_id="00" * 16, step=steps,
                                                      purpose=CHECKPOINT), args.repeats)
        state_mb = (work / "plain.pt").stat().st_size / 2**20

    print(f"bundle: Fashion-MNIST, {data_bytes / 2**20:.1f} MiB; {args.model}, {args.train_subset} images, "
          f"batch {args.batch_size}, {steps} steps an epoch; medians of {args.repeats}; this machine\n")
    print("| measure | time | per epoch of this run |")
    print("|---|---:|---:|")
    print(f"| seal the bundle (owner's machine, once) | {seal_s:.3f} s | - |")
    print(f"| open the bundle (authenticate, decrypt to memory; once per run) | {open_s:.3f} s | "
          f"{open_s / epoch_s:.2%} |")
    print(f"| one training epoch (tempo, mix, 1 in-process worker) | {epoch_s:.1f} s | 100% |")
    print(f"| checkpoint, plain torch.save ({state_mb:.0f} MiB) | {plain_s:.3f} s | - |")
    print(f"| checkpoint, sealed | {sealed_s:.3f} s | {sealed_s - plain_s:+.3f} s over plain |")
    for every in (10, 100):
        share = sealed_s * (steps / every) / epoch_s
        print(f"| sealed checkpoints every {every} steps | - | {share:.2%} |")


if __name__ == "__main__":
    main()
