"""What each blinding scheme costs: step time, enclave-side time and offload factor, side by side.

For each model one copy trains in enclave mode (plain PyTorch in this process on CPU: the pure-TEE
baseline, which on a CPU-only machine is also the plain step) and one copy per scheme under Tempo
(one in-process worker, 2 checks, anchors in the enclave as by default), on the same batches with
SGD momentum, steps interleaved round by round in rotating order after warm-up rounds (the first
of which also learns the anchors). Per scheme:

* step: wall time of a Tempo step (medians), and its ratio to the enclave-mode step;
* enclave-side: wall time minus the time spent inside worker calls (with an in-process worker,
  that is the workers' compute), i.e. what the enclave itself spends: non-product layers,
  blinding, unblinding, checks, optimizer;
* offload factor: enclave-mode step / enclave-side time, the bound on Tempo's speed-up over the
  pure enclave once workers are fast (DESIGN.md §6);
* against `permute`: each scheme's enclave-side time over permute's (the `mix` target is <= 1.3).

Usage::

    python benchmarks/scheme_cost.py --threads 1                    # resnet18, resnet50, vit_tiny
    python benchmarks/scheme_cost.py --models resnet50 --schemes permute,mix --steps 5
    python benchmarks/scheme_cost.py --models resnet18 --schemes permute,mix,mix+unfold   # convolutions unfolded
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import warnings
from dataclasses import dataclass, field

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package

import torch

import tempo
from step_overhead import NUM_CLASSES, Runner, make_batches, write_json
from tempo.training.models import build_model

MODELS = {"resnet18": ("resnet18", 1, 28), "resnet50": ("resnet50", 3, 32),
          "vit_tiny": ("timm:vit_tiny_patch16_224", 3, 32)}
MIX_TARGET = 1.3


@dataclass
class Timings:
    step_s: list[float] = field(default_factory=list)
    enclave_s: list[float] = field(default_factory=list)

    def med(self) -> tuple[float, float]:
        return statistics.median(self.step_s), statistics.median(self.enclave_s or self.step_s)


def bench(key: str, schemes: list[str], *, steps: int, warmup: int, batch_size: int) -> dict[str, Timings]:
    name, channels, size = MODELS[key]
    torch.manual_seed(0)
    base = build_model(name, num_classes=NUM_CLASSES, channels=channels, image_size=size)
    batches = make_batches(batch_size, channels, size)
    runs: dict[str, tuple[Runner, object | None]] = {"enclave": (Runner(copy.deepcopy(base), torch.device("cpu"),
                                                                        batches), None)}
    pools = []
    for label in schemes:
        scheme, _, unfold = label.partition("+")
        pools.append(pool := tempo.local_workers(1, in_process=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = tempo.protect(copy.deepcopy(base), pool, scheme=scheme, checks=2, unfold_convs=unfold == "unfold")
        runs[label] = (Runner(net, torch.device("cpu"), batches), net.engine)
    out = {label: Timings() for label in runs}
    labels = list(runs)
    for rnd in range(warmup + steps):
        for label in labels[rnd % len(labels):] + labels[:rnd % len(labels)]:
            runner, engine = runs[label]
            w0 = engine.stats.worker_seconds if engine else 0.0
            wall = runner.step()
            if rnd >= warmup:
                out[label].step_s.append(wall)
                if engine:
                    out[label].enclave_s.append(wall - (engine.stats.worker_seconds - w0))
        print(f"  [{key}] round {rnd + 1}/{warmup + steps}", file=sys.stderr, flush=True)
    for pool in pools:
        pool.close()
    return out


def report(key: str, timings: dict[str, Timings], batch_size: int) -> list[str]:
    _, c, s = MODELS[key]
    enclave_step, _ = timings["enclave"].med()
    permute_side = timings["permute"].med()[1] if "permute" in timings else None
    lines = [f"| {key} | {c}x{s}x{s} | enclave mode | {enclave_step * 1e3:.0f} | - | - | - | - |"]
    for label, t in timings.items():
        if label == "enclave":
            continue
        step, side = t.med()
        vs = f"{side / permute_side:.2f}x" if permute_side else "-"
        if label == "mix" and permute_side:
            vs += " (target <= 1.3: " + ("met" if side / permute_side <= MIX_TARGET else "MISSED") + ")"
        lines.append(f"| | | tempo `{label}` | {step * 1e3:.0f} | {step / enclave_step:.2f}x | {side * 1e3:.0f} | "
                     f"{enclave_step / side:.2f} | {vs} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--schemes", default="permute,mix",
                    help="comma-separated; SCHEME+unfold runs SCHEME with unfold_convs=True")
    ap.add_argument("--steps", type=int, default=5, help="measured rounds per model")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up rounds (the first learns the anchors)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    schemes = args.schemes.split(",")
    lines = [f"batch {args.batch_size}, {args.steps} measured rounds after {args.warmup} warm-up, "
             f"{torch.get_num_threads()} thread(s), medians; one in-process worker, checks=2, anchors in the enclave",
             "", "| model | input | run | step ms | step / enclave mode | enclave-side ms | offload factor | "
             "enclave-side / permute |", "|---|---|---|---:|---:|---:|---:|---:|"]
    results = {}
    for key in args.models.split(","):
        results[key] = bench(key, schemes, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size)
        lines += report(key, results[key], args.batch_size)
    print("\n".join(lines))
    if args.json:
        write_json(args.json, {"args": vars(args), "results": {
            k: {label: vars(t) for label, t in r.items()} for k, r in results.items()}})


if __name__ == "__main__":
    main()
