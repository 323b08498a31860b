"""How closely blinded training tracks plaintext training, step by step, for each scheme.

Trains the same model from the same seed on the same batches in ``enclave`` mode (plain PyTorch
on this CPU: the reference) and in ``tempo`` mode under each scheme (every product offloaded,
anchors included), and prints, per scheme, the
largest and the final |loss - reference loss| over the run and the first step where the gap
exceeds 1e-4. Permutations are exact, so `permute` differs from the reference only by the order
of float sums; `mix` also rounds when it blinds and unblinds (non-orthogonal keys), which is what
this measures.

Usage::

    python benchmarks/loss_tracking.py                         # small_cnn, Fashion-MNIST, 200 steps
    python benchmarks/loss_tracking.py --model small_vit --schemes permute,mix --steps 200
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import warnings
from pathlib import Path

from tempo.training.config import DatasetName, Mode, TrainConfig
from tempo.training.loop import train

GAP = 1e-4


def losses(config: TrainConfig) -> list[float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train(config, log=lambda _: None)
    return [row["loss"] for row in run.steps]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--schemes", default="permute,mix")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dataset", default="fashion-mnist", choices=[d.value for d in DatasetName])
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(model=args.model, dataset=DatasetName(args.dataset), epochs=1, batch_size=args.batch_size,
                           train_subset=args.steps * args.batch_size, test_subset=500, lr=0.05, seed=0,
                           in_process_workers=True, workers=1, progress=False, mode=Mode.ENCLAVE,
                           offload_anchors=True,
                           out=Path(tmp) / "enclave")
        reference = losses(base)
        print(f"{args.model} on {args.dataset}, {len(reference)} steps of batch {args.batch_size}, SGD momentum, "
              f"lr 0.05 cosine; reference: enclave mode (plain PyTorch, CPU)")
        print("| scheme | max abs loss gap | final abs loss gap | first step with gap > 1e-4 |")
        print("|---|---:|---:|---:|")
        for scheme in args.schemes.split(","):
            got = losses(dataclasses.replace(base, mode=Mode.TEMPO, scheme=scheme, out=Path(tmp) / scheme))
            gaps = [abs(a - b) for a, b in zip(got, reference, strict=True)]
            first = next((i + 1 for i, g in enumerate(gaps) if g > GAP), None)
            print(f"| {scheme} | {max(gaps):.2e} | {gaps[-1]:.2e} | {first or 'never'} |")


if __name__ == "__main__":
    main()
