"""Attack 10, Gram linking: follow each row (a sample, or a token) from one op's output to the next
op's input by the geometry of the rows, which a key on the columns does not hide.

Every op invocation permutes its rows with a fresh key, so which row of the next op's input is
which row of this op's output is secret. But the rows' angles are those of the plaintext rows,
through Y' Y'ᵀ = A (Y N Nᵀ Yᵀ) Aᵀ: exactly under a permutation (N Nᵀ = I), and bent by N Nᵀ under a
dense mixing. How much the bend hides depends on the data: rows spread over many equally strong
directions are bent past recognition, but a network's activations are dominated by a few
directions, and in those few N Nᵀ acts almost as a scalar (`tests/test_attack_data.py` shows
both cases). The nonlinearity between the two ops (ReLU, GELU, pooling) bends the angles a little
more, for every scheme alike.

The attacker pairs rows as a graph matching of the two Gram matrices: first by a signature that
does not depend on the unknown order (each row's largest similarities to the others, sorted, and
its norm),
then, a few rounds, by correlating each row's similarities to all rows paired so far (seeded
refinement: right pairs reinforce each other). Pairs are op outputs and the next op's input with
the same rows, except the attention products (their rows are heads x tokens, shuffled apart).

Scoring reads each op's row key. The headline is the best pair's fraction of rows linked to
themselves (see :func:`best_pair`). Random guess: 1/rows of that pair.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .alignment import chosen_step
from .base import AttackContext, Finding, NotApplicable, scoring

NAME = "gram"
SIGNATURE = 8  # largest similarities per row in the order-free signature
ROUNDS = 5  # seeded refinement rounds


def rows_of(t: Tensor) -> Tensor:
    """One vector per row: a sample of a convolution (channels and positions), a row of a product."""
    return t.double().flatten(1) if t.dim() == 4 else t.double().reshape(-1, t.shape[-1])


def cosine_gram(rows: Tensor) -> Tensor:
    """Cosine similarities of the centred rows, the diagonal zeroed (it says nothing about the others)."""
    centred = rows - rows.mean(0)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-300)
    gram = unit @ unit.T
    return gram.fill_diagonal_(0)


def _standard(t: Tensor, dim: int) -> Tensor:
    t = t - t.mean(dim, keepdim=True)
    return t / t.norm(dim=dim, keepdim=True).clamp_min(1e-300)


def assign(cost: Tensor) -> Tensor:
    """The minimum-cost one-to-one pairing of rows with columns: for each row, its column."""
    rows, cols = linear_sum_assignment(cost.numpy())
    match = torch.empty(len(rows), dtype=torch.long)
    match[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return match


def log_norms(rows: Tensor) -> Tensor:
    """Each centred row's log norm: a key on the columns scales norms, but keeps their order roughly."""
    return (rows - rows.mean(0)).norm(dim=1).clamp_min(1e-300).log()


def link(out: Tensor, nxt: Tensor, rounds: int = ROUNDS) -> Tensor:
    """For each row of `out` (an op's output), the row of `nxt` (the next op's input) judged the same."""
    a, b = rows_of(out), rows_of(nxt)
    return match_graphs(cosine_gram(a), cosine_gram(b), rounds, (log_norms(a), log_norms(b)))


def match_graphs(a: Tensor, b: Tensor, rounds: int = ROUNDS, norms: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Pair the nodes of two similarity matrices (zero diagonals): for each node of `a`, its node in `b`.

    The first pairing compares order-free signatures (each node's largest similarities, and its norm
    where given, each feature standardised over the nodes); the rounds after it refine the pairing."""
    k = min(SIGNATURE, len(a) - 1)
    extra = [n[:, None] for n in norms] if norms is not None else [a[:, :0], b[:, :0]]
    sig_a = _standard(torch.cat([a.sort(dim=1, descending=True).values[:, :k], extra[0]], 1), 0)
    sig_b = _standard(torch.cat([b.sort(dim=1, descending=True).values[:, :k], extra[1]], 1), 0)
    match = assign(torch.cdist(sig_a, sig_b))
    for _ in range(rounds):
        # node i of `a` against node j of `b`: their similarities to the nodes paired so far, in pair order
        match = assign(-(_standard(a, 1) @ _standard(b[:, match], 1).T))
    return match


def run(ctx: AttackContext) -> Finding:
    step = chosen_step(ctx)
    pairs = {}
    for i in range(len(step.ops) - 1):
        a, b = step.ops[i], step.ops[i + 1]
        if a.inside or b.inside or "bmm" in (a.kind, b.kind):
            continue
        n = len(rows_of(a.y))
        if len(rows_of(b.x)) != n or n < 3:
            continue
        match = link(a.y, b.x)
        with scoring():
            truth_a, truth_b = step.key(a, "row", n), step.key(b, "row", n)
            pairs[f"{step.op_truth(a).name} -> {step.op_truth(b).name}"] = {
                "linked": float((truth_a == truth_b[match]).double().mean()), "rows": n}
    if not pairs:
        raise NotApplicable("no two consecutive products the workers saw share their rows")
    value, baseline, best = best_pair(pairs, "rows")
    return Finding(NAME, "fraction of rows (samples, tokens) linked from an op's output to the next op's input by "
                   "their Gram matrices (best pair)", value, baseline,
                   {"best_pair": best, "pairs": pairs, "signature": SIGNATURE, "rounds": ROUNDS})


def best_pair(pairs: dict[str, dict], size: str) -> tuple[float, float, str]:
    """The headline of a linking attack over op pairs: the best pair's fraction linked, 1/its `size`, its name.

    One linked pair is enough to pool what two ops reveal; pairs with a residual sum between them
    (a transformer's attention output and the next MLP input) are not a function of each other.
    """
    best = max(pairs, key=lambda name: pairs[name]["linked"])
    return pairs[best]["linked"], 1 / pairs[best][size], best
