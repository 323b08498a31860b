"""Attack 1, direct use: the test accuracy of the model the worker assembles, with no training at all.

The model is :func:`tempo.attacks.recovery.leaked_model`. The baseline is a fresh random-init model given
the same class assignment on the aux set. Details also give the true model's accuracy and the leaked
model's with the never-sent parameters filled from the truth (an upper-bound diagnostic, not an attack).
"""

from __future__ import annotations

from . import recovery
from .base import AttackContext, Finding

NAME = "direct_use"


def _never_sent(ctx: AttackContext) -> list[str]:
    """Parameters the worker never saw in any form and the alignment gave no estimate for."""
    estimated = set(recovery.leaked_biases(ctx)) | set(recovery.leaked_weights(ctx))
    return [name for name, _ in ctx.new_model().named_parameters() if name not in estimated]


def run(ctx: AttackContext) -> Finding:
    leaked = ctx.test_accuracy(recovery.leaked_model(ctx))
    fresh = ctx.new_model(seed=ctx.seed + 1)
    recovery.assign_classes(ctx, fresh)
    details = {"true_model": ctx.test_accuracy(recovery.true_model(ctx)),
               "with_enclave_params": ctx.test_accuracy(recovery.leaked_model_with_enclave_params(ctx)),
               "left_at_fresh_init": _never_sent(ctx), "test_images": len(ctx.data.test)}
    return Finding(NAME, "test accuracy of the leaked model, used as is", leaked, ctx.test_accuracy(fresh), details)
