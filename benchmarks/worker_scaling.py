"""Step time and traffic with 1, 2 and 4 workers over the torch.distributed transport, and over a capped link.

Every configuration trains the same ResNet-18 (1x28x28, batch 64, the default ``tempo train`` model)
under the default settings (scheme ``mix``, checks=2, anchors in the enclave, every op's rows
split over the workers) on the same synthetic batches:

* ``loopback``: N local worker processes that join over 127.0.0.1 (``tempo train --workers N``);
* ``netns``: N workers in their own network namespaces, each behind a veth to a bridge whose
  address the enclave (this process, root namespace) listens on: the two-host setup on one machine;
* ``netns-capped``: the same with every worker's link capped at ``--rate`` (default 1gbit) in both
  directions by ``tc tbf``, to show when the wire becomes the bottleneck.

Reported per configuration: median step time, bytes sent and received per step (all links
together); for capped links also the time those bytes take at the cap one after another (an upper
bound on the wire's share: the ops of a step depend on each other, so little of their traffic can
overlap) and what the cap added to the step time of the same workers uncapped.

On this 2-core machine the enclave and every worker share the same two cores, so more workers
cannot make compute faster here: what the numbers can show is the cost of sharding (messages, W'
sent to every worker of a split op) and where a capped wire starts to dominate; what they cannot
show is the speed-up of N real GPUs. Needs root and iproute2 for the netns rows (``--only
loopback`` skips them).

Usage::

    python benchmarks/worker_scaling.py                        # 1, 2, 4 workers; loopback, netns, netns capped
    python benchmarks/worker_scaling.py --workers 1,2 --steps 3 --only loopback
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package

import torch

import tempo
from step_overhead import Runner, make_batches, write_json
from tempo.enclave.distributed import ProcessPool
from tempo.testing.netns import hosts
from tempo.training.models import build_model

LINKS = ("loopback", "netns", "netns-capped")


@dataclass
class Row:
    link: str
    workers: int
    step_s: list[float] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)

    def med(self, name: str) -> float:
        return statistics.median(getattr(self, name))

    def line(self, rate_bits: float, uncapped: Row | None) -> str:
        """The row; a capped one also gives the time all its bytes take at the cap one after another, and
        what the cap added to the step of the same workers uncapped."""
        step, sent, received = self.med("step_s"), self.med("sent"), self.med("received")
        wire = added = "-"
        if self.link == "netns-capped":
            wire = f"{(sent + received) * 8 / rate_bits * 1e3:.0f}"
            added = f"{(step - uncapped.med('step_s')) * 1e3:+.0f}" if uncapped else "-"
        return (f"| {self.link} | {self.workers} | {step * 1e3:.0f} | {sent / 2**20:.1f} | {received / 2**20:.1f} | "
                f"{wire} | {added} |")


def measure(row: Row, pool, base: torch.nn.Module, batches, *, steps: int, warmup: int) -> Row:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = tempo.protect(copy.deepcopy(base), pool)
    runner = Runner(net, torch.device("cpu"), batches)
    for i in range(warmup + steps):
        s0, r0 = pool.stats.bytes_sent, pool.stats.bytes_received
        wall = runner.step()
        if i >= warmup:
            row.step_s.append(wall)
            row.sent.append(pool.stats.bytes_sent - s0)
            row.received.append(pool.stats.bytes_received - r0)
        print(f"  [{row.link}, {row.workers} worker(s)] step {i + 1}/{warmup + steps}: {wall:.2f} s",
              file=sys.stderr, flush=True)
    return row


@contextmanager
def namespaced_pool(n: int, rate: str | None) -> Iterator[ProcessPool]:
    """n workers, each in its own network namespace (its link capped at `rate`), joined to this process."""
    with hosts(n, rate=rate) as network, ProcessPool(
            n, timeout=300, listen=f"{network.root_address}:0",
            launch=lambda i, argv: network.hosts[i].command(*argv)) as pool:
        yield pool


def bits_per_second(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate.removesuffix(unit)) * scale
    raise SystemExit(f"--rate takes a tc rate in kbit, mbit or gbit (e.g. 1gbit), got {rate!r}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    ap.add_argument("--only", default=",".join(LINKS), help=f"comma-separated links among {', '.join(LINKS)}")
    ap.add_argument("--rate", default="1gbit", help="the cap of netns-capped links (tc rate)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps (the first learns the anchors)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    rate_bits = bits_per_second(args.rate)
    torch.manual_seed(0)
    base = build_model("resnet18", num_classes=10, channels=1, image_size=28)
    batches = make_batches(args.batch_size, 1, 28)
    rows = []
    for link in args.only.split(","):
        if link not in LINKS:
            raise SystemExit(f"unknown link {link!r}; choose among {', '.join(LINKS)}")
        for n in (int(w) for w in args.workers.split(",")):
            start = time.perf_counter()
            pool_cm = (ProcessPool(n, timeout=300) if link == "loopback"
                       else namespaced_pool(n, args.rate if link == "netns-capped" else None))
            with pool_cm as pool:
                rows.append(measure(Row(link, n), pool, base, batches, steps=args.steps, warmup=args.warmup))
            print(f"  [{link}, {n}] done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"ResNet-18 1x28x28, batch {args.batch_size}, scheme mix, checks=2, anchors inside; {args.steps} measured "
          f"steps after {args.warmup} warm-up, medians; {os.cpu_count()} cores shared by the enclave and all workers")
    print(f"\n| link | workers | step ms | MiB sent / step | MiB received / step | sent + received at {args.rate}, "
          "ms | added by the cap, ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    uncapped = {row.workers: row for row in rows if row.link == "netns"}
    for row in rows:
        print(row.line(rate_bits, uncapped.get(row.workers)))
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": [asdict(r) for r in rows]})


if __name__ == "__main__":
    main()
