"""Attack 11, Gram linking of units: match each output unit of an op to the next op's input unit by
the units' correlations with each other.

The unit-side twin of :mod:`.gram`. Over the many rows of one step (every sample and position of a
convolution, every token of a transformer), unit u of Y' is a column, and the correlations
between columns are a unit x unit matrix that the row key cannot touch (it sums over rows). Under a
permutation of the units that matrix is the plaintext's, relabelled; the next op's input units,
after a ReLU, GELU or pooling, correlate nearly alike, so the two matrices match as graphs. Under
a dense mixing each blinded unit is a mixture, and the matrix is the plaintext's bent by the key.

Pairs are an op's output and the next op's input of the same width (a flatten, which spreads a
channel over positions, or an attention product is not a unit-to-unit map). Scoring reads the
keys (under `mix` a blinded unit counts as its dominant plain unit, see ``Step.key``); the
headline is the best pair's fraction of units linked to themselves (see :func:`.gram.best_pair`).
Random guess: 1/units of that pair.
"""

from __future__ import annotations

from torch import Tensor

from .alignment import chosen_step
from .base import AttackContext, Finding, NotApplicable, scoring
from .gram import best_pair, match_graphs

NAME = "gram_units"


def columns_of(t: Tensor) -> Tensor:
    """One vector per unit over all rows: a convolution's channels over samples and positions."""
    t = t.double()
    return (t.movedim(1, -1) if t.dim() == 4 else t).reshape(-1, t.shape[1 if t.dim() == 4 else -1]).T


def correlations(units: Tensor) -> Tensor:
    """Correlations between units (dead units correlate with nothing), diagonal zeroed."""
    centred = units - units.mean(1, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (unit @ unit.T).fill_diagonal_(0)


def run(ctx: AttackContext) -> Finding:
    step = chosen_step(ctx)
    pairs = {}
    for i in range(len(step.ops) - 1):
        a, b = step.ops[i], step.ops[i + 1]
        if a.inside or b.inside or "bmm" in (a.kind, b.kind) or a.y.dim() != b.x.dim():
            continue
        out, inner = columns_of(a.y), columns_of(b.x)
        n = len(out)
        if len(inner) != n or n < 3:
            continue
        match = match_graphs(correlations(out), correlations(inner))
        with scoring():
            truth_a, truth_b = step.key(a, "out", n), step.key(b, "inner", n)
            pairs[f"{step.op_truth(a).name} -> {step.op_truth(b).name}"] = {
                "linked": float((truth_a == truth_b[match]).double().mean()), "units": n}
    if not pairs:
        raise NotApplicable("no two consecutive products the workers saw pass units one to one")
    value, baseline, best = best_pair(pairs, "units")
    return Finding(NAME, "fraction of an op's output units linked to the next op's input units by their "
                   "correlation matrices (best pair)", value, baseline, {"best_pair": best, "pairs": pairs})
