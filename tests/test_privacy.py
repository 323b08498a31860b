"""What a worker receives: never a plaintext operand (or its transpose), for every op of a step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import tempo
from conftest import protect_quietly
from tempo.testing import RecordingPool
from tempo.training.models import build_model


class _PlainOperands(TorchFunctionMode):
    """Collects every operand, result and result gradient of the products of a plain step."""

    PRODUCTS = {F.linear, F.conv2d, torch.matmul, torch.Tensor.__matmul__, F.scaled_dot_product_attention}

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.PRODUCTS:
            self.seen += [a.detach().clone() for a in args if isinstance(a, torch.Tensor) and a.dim() > 0]
            self.seen.append(out.detach().clone())
            if out.requires_grad:
                out.register_hook(lambda g: self.seen.append(g.detach().clone()))
        return out


def _plaintext_views(t: torch.Tensor) -> list[torch.Tensor]:
    """The operand as a worker might see it unblinded: flattened rows, batched, transposed."""
    views = [t, t.reshape(-1, t.shape[-1])] if t.dim() >= 2 else [t]
    if t.dim() >= 3:
        views.append(t.reshape(-1, *t.shape[-2:]))
    return views + [v.transpose(-2, -1) for v in views if v.dim() >= 2]


def _leaks(received, plaintexts) -> list[str]:
    found = []
    for field, r in received:
        for p in plaintexts:
            for v in _plaintext_views(p):
                if v.shape == r.shape and torch.equal(v, r):
                    found.append(f"{field} {list(r.shape)}")
    return found


@pytest.mark.parametrize("model_name", ["resnet18", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("scheme", ["permute", "mix", "none"])
def test_worker_never_sees_plaintext(model_name, scheme):
    size = 32 if "vit" in model_name else 28
    model = build_model(model_name, num_classes=10, channels=1, image_size=size)
    x, y = torch.randn(4, 1, size, size), torch.randint(0, 10, (4,))
    plain = _PlainOperands()
    with plain:  # the plaintext operands of the same step (same weights, same input)
        F.cross_entropy(copy.deepcopy(model)(x), y).backward()
    with tempo.local_workers(1, in_process=True) as inner:
        pool = RecordingPool(inner)
        protected = protect_quietly(model, pool, scheme=scheme)
        F.cross_entropy(protected(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    assert len(pool.received) > 30 and len(plain.seen) > 60
    leaks = _leaks(pool.received + pool.returned, plain.seen + grads + [x])
    if scheme == "none":
        assert leaks, "the recording check must detect plaintext under the insecure reference scheme"
    else:
        assert not leaks, f"plaintext reached a worker: {leaks[:5]}"
