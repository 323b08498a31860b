"""Inference side by side in one run: blinded (Tempo) vs enclave-only vs plain PyTorch.

For each model (default: torchvision resnet50 on 3x32x32, and ViT-tiny with 4x4 patches on 3x32x32,
65 tokens) and each batch size (default 1, 32, 128), three copies of the same weights run the same
random batches in ``eval()`` under ``torch.no_grad()``:

* ``plain``    ordinary PyTorch on ``--device`` (the workers' device: CUDA when there is one);
* ``enclave``  ordinary PyTorch on CPU in this process: the whole forward inside the enclave;
* ``tempo``    the model protected (default scheme ``mix``, 2 checks, anchors inside) over ``--workers``
               separate worker processes on ``--device``; the enclave (this process) runs on CPU.

Forwards are interleaved in rounds (one of each per round) after warm-up rounds. Reported per row:
images/s (batch / median latency), p50 and p99 latency, and for ``tempo`` the enclave-process CPU
seconds per forward and the inference **offload factor**: the CPU seconds of the same forward done
wholly in this process (``enclave``) over those of this process during a blinded forward. A factor
above 1 means serving through Tempo costs the enclave less than serving inside it.

This machine's numbers mean little when the workers share its cores (their compute and the
enclave's take turns); run it where the workers have their own devices.

Usage::

    python benchmarks/inference.py                                   # the full table (slow on a CPU)
    python benchmarks/inference.py --models small_cnn --batches 1,4 --rounds 2 --warmup 1   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: the enclave and workers share cores

import torch

import tempo
from tempo.training.models import build_model

MODELS = {  # name: (architecture, C, image size); ViT-tiny at 32x32 gets 4x4 patches (64 + 1 tokens)
    "resnet50": ("resnet50", 3, 32),
    "vit_tiny": ("vit_tiny_patch16_224", 3, 32),
    "small_cnn": ("small_cnn", 3, 16),
    "small_vit": ("small_vit", 3, 16),
}


@dataclass
class Row:
    model: str
    batch: int
    mode: str
    latencies: list[float]
    cpu: list[float]  # this process's CPU seconds per forward

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    @property
    def images_per_s(self) -> float:
        return self.batch / statistics.median(self.latencies)


def _timed(forward, x: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one forward."""
    x = x.to(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        forward(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str, batch: int, args: argparse.Namespace, pool) -> list[Row]:
    arch, channels, size = MODELS[name]
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, channels=channels, image_size=size).eval()
    device = torch.device(args.device)
    plain = copy.deepcopy(model).to(device).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the anchors' one-line notice
        protected = tempo.protect(copy.deepcopy(model), pool, scheme=args.scheme, checks=args.checks).eval()
    modes = {"plain": (plain, device), "enclave": (model, torch.device("cpu")),
             "tempo": (protected, torch.device("cpu"))}
    rows = {mode: Row(name, batch, mode, [], []) for mode in modes}
    for r in range(args.warmup + args.rounds):
        x = torch.randn(batch, channels, size, size)
        for mode, (net, where) in modes.items():
            wall, cpu = _timed(net, x, where)
            if r >= args.warmup:
                rows[mode].latencies.append(wall)
                rows[mode].cpu.append(cpu)
    return list(rows.values())


def table(rows: list[Row]) -> str:
    lines = ["| model | batch | mode | images/s | p50 ms | p99 ms | enclave CPU s / forward | offload factor |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        inside = next(r for r in rows if (r.model, r.batch, r.mode) == (row.model, row.batch, "enclave"))
        cpu = statistics.median(row.cpu)
        factor = f"{statistics.median(inside.cpu) / cpu:.2f}" if row.mode == "tempo" else "-"
        enclave_cpu = f"{cpu:.3f}" if row.mode != "plain" else "-"
        lines.append(f"| {row.model} | {row.batch} | {row.mode} | {row.images_per_s:.1f} | "
                     f"{row.percentile(50) * 1000:.1f} | {row.percentile(99) * 1000:.1f} | {enclave_cpu} | {factor} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,vit_tiny", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--rounds", type=int, default=10, help="measured forwards per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--scheme", default="mix")
    parser.add_argument("--checks", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the workers' and plain PyTorch's device")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    rows: list[Row] = []
    with tempo.local_workers(args.workers, device=args.device) as pool:
        for name in names:
            for batch in (int(b) for b in args.batches.split(",")):
                rows += measure(name, batch, args, pool)
                print(f"measured {name} batch {batch}", file=sys.stderr, flush=True)
    print(f"scheme {args.scheme}, checks {args.checks}, anchors inside, {args.workers} worker process(es) on "
          f"{args.device}; {args.rounds} measured rounds after {args.warmup} warm-up; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s) here\n")
    print(table(rows))


if __name__ == "__main__":
    main()
