"""Attack 3, linking across steps: follow each weight unit from one step's blinded W' to the next.

Fresh keys per step are meant to make step t's W' and step t+1's W' look unrelated. But a permutation
hides order, not values, and one optimiser step moves the weights very little. So the worker gives
every unit (a row: an output unit; a column: an input unit) a signature that does not depend on the
other axis' permutation, namely its values sorted along that other axis, and solves the assignment
between the two steps' units by distance. A unit linked across all steps can be followed through the
run, which is what lets later attacks pool evidence over many steps.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .base import AttackContext, Finding
from .transcript import Step, scoring

NAME = "linking"

_AXES = {"out": 0, "inner": 1}  # key role -> axis of W' ([OUT, INNER] or [OUT, INNER, kh, kw])


def signatures(w: Tensor, axis: int) -> Tensor:
    """One vector per unit along `axis`, invariant to any permutation of the other blinded axis.

    The other channel axis is sorted per kernel position (spatial axes are not permuted), so a conv
    unit keeps its kernel layout and a linear unit becomes its sorted row or column.
    """
    units = w.movedim(axis, 0).double()
    return units.sort(dim=1).values.reshape(units.shape[0], -1)


def link(a: Tensor, b: Tensor) -> tuple[np.ndarray, float]:
    """Match units of signatures `a` (step t) to `b` (step t+1): the minimum total distance assignment.

    Also returns the median margin, the distance to the chosen partner over the distance to the next
    closest candidate: well below 1 means the links are unambiguous, near 1 that they are guesses.
    """
    cost = torch.cdist(a, b).numpy()
    rows, cols = linear_sum_assignment(cost)
    match = np.empty(len(a), dtype=np.int64)
    match[rows] = cols
    chosen = cost[np.arange(len(a)), match]
    others = cost.copy()
    others[np.arange(len(a)), match] = np.inf
    return match, float(np.median(chosen / np.maximum(others.min(axis=1), 1e-30)))


@scoring()
def _score(before: Step, after: Step, index: int, role: str, match: np.ndarray) -> int:
    """How many links i -> match[i] join the same plaintext unit (truth used only here)."""
    n = len(match)
    k0, k1 = before.key(before.ops[index], role, n), after.key(after.ops[index], role, n)
    return int((k0 == k1[torch.as_tensor(match)]).sum())


def _link_axis(steps: list[Step], index: int, role: str) -> dict:
    """Link one axis of op `index`'s weight over every pair of consecutive steps; score the links."""
    axis = _AXES[role]
    n = steps[0].ops[index].w.shape[axis]
    if n == 1:
        return {"units": 1, "pairs": 0, "correct": 0, "accuracy": None, "note": "size 1: trivially linked"}
    hits, margins = [], []
    for before, after in itertools.pairwise(steps):
        match, margin = link(signatures(before.ops[index].w, axis), signatures(after.ops[index].w, axis))
        hits.append(_score(before, after, index, role, match))
        margins.append(margin)
    pairs = len(hits)
    return {"units": n, "pairs": pairs, "correct": sum(hits), "accuracy": sum(hits) / (n * pairs) if pairs else None,
            "random": 1 / n, "median_margin": float(np.median(margins)) if pairs else None}


def run(ctx: AttackContext) -> Finding:
    steps = ctx.transcript.steps
    seen = steps[0].seen
    layers = {site.name: {role: _link_axis(steps, i, role) for role in _AXES}
              for i, site in enumerate(ctx.sites) if site.weight is not None and i in seen}
    axes = [a for layer in layers.values() for a in layer.values() if a["pairs"]]
    total = sum(a["units"] * a["pairs"] for a in axes)
    if total == 0:
        raise ValueError("linking needs at least two recorded steps and a weight axis of size > 1")
    correct = sum(a["correct"] for a in axes)
    expected = sum(a["pairs"] for a in axes)  # a random assignment links 1/n of n units per pair: one
    gaps = sorted({after.step - before.step for before, after in itertools.pairwise(steps)})
    return Finding(NAME, "fraction of weight units linked correctly between consecutive steps",
                   correct / total, expected / total, {"layers": layers, "linked_units": total, "step_gaps": gaps})
