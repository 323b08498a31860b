"""Attack 2, fine-tune from the leak: is the leaked model worth more than a random init to a thief?

A thief with a little labelled data can train the public architecture from scratch, or start from the
weights it assembled from the transcript (:func:`tempo.attacks.recovery.leaked_model`). Both starts get
the same public data (as many images as 1%, 5% and 10% of the run's training set, drawn by the attacker's
seed from its public pool, which no training step saw) and the same step budget; the
test-accuracy gap between them is what the leak is worth. A useless leak is a random init, so the
random-guess baseline is a gap of zero. The gap shrinks as the thief's own data grows, which is why
it is reported per fraction.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import recovery
from .base import AttackContext, Finding

NAME = "finetune"

FRACTIONS = (0.01, 0.05, 0.10)
BATCH_SIZE = 64
LR = 1e-3
_MAX_THREADS = 4  # small models: more threads cost more than they give


@contextlib.contextmanager
def _few_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, _MAX_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thief_data(ctx: AttackContext, fraction: float) -> tuple[Tensor, Tensor]:
    """Public images, as many as `fraction` of the run's training set, in a seeded order: its first part is each
    smaller fraction's data."""
    public = ctx.data.public
    order = torch.randperm(len(public), generator=torch.Generator().manual_seed(ctx.seed))
    images, labels = zip(*(public[int(i)] for i in order[:_size(ctx, fraction)]), strict=True)
    return torch.stack(images), torch.tensor(labels)


def _size(ctx: AttackContext, fraction: float) -> int:
    return min(len(ctx.data.public), max(1, round(fraction * ctx.data.training_set_size)))


def fine_tune(model: nn.Module, images: Tensor, labels: Tensor, steps: int, seed: int) -> nn.Module:
    """`steps` Adam steps on shuffled batches; the batch order depends only on the seed."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    torch.manual_seed(seed)  # dropout, if any
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < min(BATCH_SIZE, len(labels)):
            order = torch.cat([order, torch.randperm(len(labels), generator=generator)])
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    return model


def run(ctx: AttackContext) -> Finding:
    steps = int(ctx.options.get("finetune_steps", 200))
    with _few_threads():
        leaked = recovery.leaked_model(ctx).cpu()
        scratch = ctx.new_model().cpu()
        pool, pool_labels = thief_data(ctx, max(FRACTIONS))
        per_fraction = {}
        for fraction in FRACTIONS:
            images, labels = pool[:_size(ctx, fraction)], pool_labels[:_size(ctx, fraction)]
            accs = {start: ctx.test_accuracy(fine_tune(copy.deepcopy(model), images, labels, steps, ctx.seed))
                    for start, model in (("leaked", leaked), ("scratch", scratch))}
            per_fraction[f"{fraction:.0%}"] = {"images": len(labels), "leaked_start": accs["leaked"],
                                               "scratch_start": accs["scratch"],
                                               "gap": accs["leaked"] - accs["scratch"]}
        untrained = {"leaked": ctx.test_accuracy(leaked), "scratch": ctx.test_accuracy(scratch)}
    gaps = [f["gap"] for f in per_fraction.values()]
    return Finding(NAME, "test-accuracy gain of fine-tuning from the leak over from scratch",
                   sum(gaps) / len(gaps), 0.0,
                   {"fractions": per_fraction, "before_fine_tuning": untrained, "steps": steps,
                    "batch_size": BATCH_SIZE, "optimizer": f"Adam lr {LR}", "test_images": len(ctx.data.scoring)})
