"""Key lifetime K: traffic, enclave CPU time and step time per training step, several K side by side.

With ``key_lifetime=K`` each weight keeps its key for K training steps: its worker keeps the
blinded weight W' resident (installed once per key) and repeats each optimizer step on it, so
forward jobs no longer carry W'. K=1 is the old behaviour (W' sent with every product).

For each model (default: torchvision resnet18 on 1x28x28, timm vit_tiny_patch16_224 on 3x32x32;
built as in step_overhead.py) one copy of the same initial model per K is protected with
``scheme="permute", checks=2`` and real (unseeded) keys, each on its own worker process
(``tempo.local_workers(1)``), and all train on the same synthetic batches with the same optimizer
(SGD lr 0.01 + momentum 0.9, or ``--optimizer adamw``). Steps are interleaved in rounds, one step
of every K per round in an order that rotates from round to round, so that machine noise hits all
K alike; ``--warmup`` rounds come first and are not measured. Per measured step:

* bytes sent to / received from the worker: deltas of the pool's byte counters (socket frames);
* enclave CPU time: ``time.process_time()`` delta of this process, so the worker's compute (and
  its repeated optimizer steps) is not in it, but blinding, checks, installs and updates are;
* wall time of the step.

Bytes and CPU time are averaged over all measured steps, installs included; step time is given
as median (a typical step) and mean (installs are periodic spikes). Keys expire by training step:
a key installed at step s is replaced at step s+K, so any run of N consecutive steps with N a
multiple of K holds exactly N/K installs per weight, whatever the warm-up; hence ``--steps`` must
be a multiple of every K. The first install (step 1, before the optimizer has state to send with
it) falls in the warm-up when ``--warmup`` >= 1, so every measured install is a steady-state one.

All K start from the same weights and see the same batches, so their losses agree up to float
rounding (blinding permutes the order of sums); the largest difference is printed as a sanity check,
with the first step whose difference exceeds 1e-4. Training can amplify rounding chaotically (resnet18
here, from about step 4 on: two K=1 runs with different keys part just as far), so a late divergence
after agreement to ~1e-6 is not by itself a sign of a wrong update.

Usage::

    python benchmarks/key_lifetime.py                         # both models, K = 1, 10, 100
    python benchmarks/key_lifetime.py --models resnet18 --steps 10 --lifetimes 1,5 --warmup 1 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep, as `tempo train`; workers inherit it
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tempo
from step_overhead import MODELS, NUM_CLASSES, make_batches, write_json
from tempo.enclave.pools import WorkerPool
from tempo.training.models import build_model

MB = 1e6
LOSS_GAP = 1e-4  # loss difference beyond float rounding at the first steps


@dataclass
class Series:
    """Measurements of one key lifetime: per measured step, and the loss of every step."""

    lifetime: int
    sent: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {"sent_bytes": statistics.fmean(self.sent), "received_bytes": statistics.fmean(self.received),
                "cpu_s": statistics.fmean(self.cpu_s), "wall_median_s": statistics.median(self.wall_s),
                "wall_mean_s": statistics.fmean(self.wall_s)}


class KeyRun:
    """One protected copy of the model with key lifetime K, on its own worker, with its own optimizer."""

    def __init__(self, base: nn.Module, lifetime: int, pool: WorkerPool, batches: list[tuple[Tensor, Tensor]],
                 optimizer: str, lr: float):
        self.pool, self.batches, self.series = pool, batches, Series(lifetime)
        self.model = tempo.protect(copy.deepcopy(base), pool, scheme="permute", checks=2, key_lifetime=lifetime,
                                   offload_anchors=True,
                                   key_seed=None)
        params = self.model.parameters()
        self.opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd"
                    else torch.optim.AdamW(params, lr=lr))

    def step(self, measure: bool) -> None:
        s = self.series
        x, y = self.batches[len(s.loss) % len(self.batches)]
        sent, received = self.pool.stats.bytes_sent, self.pool.stats.bytes_received
        cpu, wall = time.process_time(), time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        s.loss.append(loss.item())
        if measure:
            s.wall_s.append(wall)
            s.cpu_s.append(cpu)
            s.sent.append(self.pool.stats.bytes_sent - sent)  # a process pool replaces its stats object
            s.received.append(self.pool.stats.bytes_received - received)


@dataclass
class ModelResult:
    model: str
    input: str
    series: list[Series]

    def loss_gaps(self) -> dict[int, tuple[float, int | None]]:
        """Per K: max |loss(K) - loss(first K)| over every step (warm-up included), and the first step
        (1-based) where it exceeds LOSS_GAP, to tell rounding from a divergence and see where one starts."""
        ref = self.series[0].loss
        out = {}
        for s in self.series[1:]:
            gaps = [abs(a - b) for a, b in zip(s.loss, ref, strict=True)]
            out[s.lifetime] = max(gaps), next((i + 1 for i, g in enumerate(gaps) if g > LOSS_GAP), None)
        return out


def bench_model(key: str, *, lifetimes: list[int], steps: int, warmup: int, batch_size: int, optimizer: str,
                lr: float) -> ModelResult:
    name, channels, size = MODELS[key]
    torch.manual_seed(0)
    base = build_model(name, num_classes=NUM_CLASSES, channels=channels, image_size=size)
    batches = make_batches(batch_size, channels, size)
    with ExitStack() as stack:
        runs = [KeyRun(base, k, stack.enter_context(tempo.local_workers(1)), batches, optimizer, lr)
                for k in lifetimes]
        for rnd in range(warmup + steps):
            first = rnd % len(runs)
            for run in runs[first:] + runs[:first]:  # rotate so no K always runs first
                run.step(measure=rnd >= warmup)
            print(f"  [{key}] {rnd + 1}/{warmup + steps}{'' if rnd >= warmup else ' (warm-up)'}",
                  file=sys.stderr, flush=True)
    return ModelResult(key, f"{channels}x{size}x{size}", [r.series for r in runs])


def report(results: list[ModelResult], args: argparse.Namespace) -> str:
    lines = [f"Tempo key lifetime (scheme=permute, checks=2, one worker process per K; {args.optimizer} lr {args.lr}, "
             f"batch {args.batch_size}; {args.steps} measured rounds after {args.warmup} warm-up; torch "
             f"{torch.__version__}, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} cpus at the end)."]
    for r in results:
        base = r.series[0].summary()
        k0 = r.series[0].lifetime
        lines += ["", f"{r.model} ({r.input}): means per step over all measured steps, installs included", "",
                  "| K | sent MB/step | received MB/step | enclave CPU ms/step | step ms (median) | step ms (mean) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for s in r.series:
            q = s.summary()
            lines.append(f"| {s.lifetime} | {q['sent_bytes'] / MB:.2f} | {q['received_bytes'] / MB:.2f} | "
                         f"{q['cpu_s'] * 1e3:.1f} | {q['wall_median_s'] * 1e3:.1f} | {q['wall_mean_s'] * 1e3:.1f} |")
        lines += ["", f"| K | sent / K={k0} | enclave CPU / K={k0} | step median / K={k0} | step mean / K={k0} |",
                  "|---:|---:|---:|---:|---:|"]
        for s in r.series:
            q = s.summary()
            lines.append(f"| {s.lifetime} | " + " | ".join(
                f"{q[m] / base[m]:.3f}" for m in ("sent_bytes", "cpu_s", "wall_median_s", "wall_mean_s")) + " |")
        gaps = ", ".join(f"K={k}: {g:.2e} (first above {LOSS_GAP:g}: {'none' if at is None else f'step {at}'})"
                         for k, (g, at) in r.loss_gaps().items())
        lines += ["", f"max |loss(K) - loss(K={k0})| over all {len(r.series[0].loss)} steps: {gaps or '-'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lifetimes", default="1,10,100",
                    help="comma-separated key lifetimes K (default 1,10,100); the first is the reference, and "
                         "repeating it (1,1,...) adds a control run that differs only in its keys")
    ap.add_argument("--steps", type=int, default=100, help="measured rounds per model, a multiple of every K")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up rounds per model, not measured (default 2)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    ap.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd: momentum 0.9 (default)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the enclave and in each worker")
    ap.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    args = ap.parse_args(argv)
    lifetimes = [int(k) for k in args.lifetimes.split(",") if k.strip()]  # a repeated K: a control run
    keys = [m.strip() for m in args.models.split(",") if m.strip()]
    if not lifetimes or min(lifetimes) < 1:
        ap.error("--lifetimes: integers >= 1")
    if args.steps < 1 or args.steps % math.lcm(*lifetimes):
        ap.error(f"--steps must be a positive multiple of every K ({math.lcm(*lifetimes)})")
    if unknown := [k for k in keys if k not in MODELS]:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the worker processes as they start
    results = [bench_model(k, lifetimes=lifetimes, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                           optimizer=args.optimizer, lr=args.lr) for k in keys]
    print(report(results, args))
    if args.json:
        write_json(args.json, {"args": vars(args), "results": [
            {"model": r.model, "input": r.input, "loss_gaps": r.loss_gaps(),
             "series": [{**asdict(s), "summary": s.summary()} for s in r.series]} for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
