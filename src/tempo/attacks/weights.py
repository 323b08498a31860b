"""Attack 5, weight recovery: how close the worker's assembled weights are to the true ones, layer by layer.

The recovered weights are :func:`tempo.attacks.recovery.leaked_model`'s; the truth is the chosen step's
parameters expressed in the attacker's own basis (its choice of hidden-unit order is a symmetry of the
network, not an error). Cosine similarity is scale-free and 0 in expectation for unrelated centred weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import recovery
from .base import AttackContext, Finding

NAME = "weights"
_DRAWS = 5  # random alignments averaged for the baseline


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _shuffled(w: Tensor, generator: torch.Generator) -> Tensor:
    """`w` with its output and inner axes in random orders: what a random alignment would give."""
    return w[torch.randperm(w.shape[0], generator=generator)][:, torch.randperm(w.shape[1], generator=generator)]


def run(ctx: AttackContext) -> Finding:
    model = recovery.leaked_model(ctx)
    truth = recovery.true_weights_in_basis(ctx)
    generator = torch.Generator().manual_seed(ctx.seed)
    layers = {}
    for name, true in truth.items():
        got = model.get_parameter(name).detach()
        chance = sum(_cosine(_shuffled(got, generator), true) for _ in range(_DRAWS)) / _DRAWS
        layers[name] = {"cosine": _cosine(got, true), "random_alignment": chance,
                        "relative_error": float((got - true).norm() / true.norm())}
    mean = sum(v["cosine"] for v in layers.values()) / len(layers)
    baseline = sum(v["random_alignment"] for v in layers.values()) / len(layers)
    return Finding(NAME, "mean cosine similarity of recovered to true weights (attacker's basis)", mean, baseline,
                   {"layers": layers})
