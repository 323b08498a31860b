"""Attack 1, direct use: the test accuracy of the model the worker assembles, with no training at all.

The model is :func:`tempo.attacks.recovery.leaked_model`. The baseline is the mean over ``FRESH_MODELS``
random-init models, each given the same class assignment on the aux set: one random model's accuracy
swings by several points with its seed, too much for a "within 2 points of chance" verdict (the
spread is in the details). Details also give the true model's accuracy and the leaked
model's with the never-sent parameters filled from the truth (an upper-bound diagnostic, not an attack).
"""

from __future__ import annotations

import torch

from . import recovery
from .base import AttackContext, Finding

NAME = "direct_use"
FRESH_MODELS = 20


def _never_sent(ctx: AttackContext) -> list[str]:
    """Parameters the worker never saw in any form and the alignment gave no estimate for."""
    estimated = set(recovery.leaked_biases(ctx)) | set(recovery.leaked_weights(ctx))
    return [name for name, _ in ctx.new_model().named_parameters() if name not in estimated]


def run(ctx: AttackContext) -> Finding:
    leaked = ctx.test_accuracy(recovery.leaked_model(ctx))
    chance = torch.tensor([_fresh_accuracy(ctx, ctx.seed + 1 + i) for i in range(FRESH_MODELS)])
    details = {"true_model": ctx.test_accuracy(recovery.true_model(ctx)),  # both read the truth: scoring only
               "with_enclave_params": ctx.test_accuracy(recovery.leaked_model_with_enclave_params(ctx)),
               "fresh_models": chance.tolist(), "fresh_std": float(chance.std()),
               "fresh_range": [float(chance.min()), float(chance.max())],
               "left_at_fresh_init": _never_sent(ctx), "test_images": len(ctx.data.scoring)}
    return Finding(NAME, "test accuracy of the leaked model, used as is", leaked, float(chance.mean()), details)


def _fresh_accuracy(ctx: AttackContext, seed: int) -> float:
    fresh = ctx.new_model(seed=seed)
    recovery.assign_classes(ctx, fresh)
    return ctx.test_accuracy(fresh)
