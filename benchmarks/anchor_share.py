"""How much of a training step's product work the anchors keep inside the enclave.

The anchors are the first product of a forward (it sees the raw inputs) and the last (its output
gradient carries the labels); by default they run in the enclave (``tempo.enclave.anchors``). For
each model this learns them exactly as ``protect`` does (one forward under an in-process pool) and
counts the FLOPs of one training step (forward and backward, batch ``--batch-size``) with
``torch.utils.flop_counter``: the anchors' share is the enclave's extra product work.

Usage::

    python benchmarks/anchor_share.py                      # resnet50 and vit_tiny on 3x32x32, resnet18 on 1x28x28
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tempo
from scheme_cost import MODELS
from tempo.training.models import build_model


def anchor_share(key: str, batch: int) -> tuple[tuple[str, str], float, float]:
    """(anchor op names, their FLOPs, all product FLOPs) of one training step."""
    name, channels, size = MODELS[key]
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, channels=channels, image_size=size)
    x, y = torch.randn(batch, channels, size, size), torch.randint(0, 10, (batch,))
    with tempo.local_workers(1, in_process=True) as pool, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = tempo.protect(copy.deepcopy(model), pool)
        net(x[:2])
    anchors = net.engine.anchors.names
    assert anchors is not None
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    inside = sum(counts.get(f"{root}.{a.split(':')[0]}", 0) for a in set(anchors))
    return anchors, inside, counts["Global"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50,vit_tiny,resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    print("| model | input | first product | last product | anchors' FLOPs | all product FLOPs | share kept inside |")
    print("|---|---|---|---|---:|---:|---:|")
    for key in args.models.split(","):
        (first, last), inside, total = anchor_share(key, args.batch_size)
        _, c, s = MODELS[key]
        print(f"| {key} | {c}x{s}x{s} | `{first}` | `{last}` | {inside / 1e9:.3f} G | {total / 1e9:.2f} G | "
              f"{inside / total:.2%} |")


if __name__ == "__main__":
    main()
