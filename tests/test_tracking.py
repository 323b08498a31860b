"""Whole models, step for step: blinded training tracks plaintext training to float rounding.

float64: Tempo's losses equal plain PyTorch's over 20 steps. float32: every training step Tempo takes is judged
against the same step in float64 from the same state, by plain float32's own error (tests/tolerance.py,
docs/correctness.md): a float32 trajectory is chaotic, so comparing two of them measures the CPU's kernels.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import tempo
from conftest import compare_with_plain, protect_quietly
from tempo.enclave.sharding import ShardedOp
from tempo.training.models import build_model
from tolerance import EPS32, assert_as_exact_as_float32

STEPS = 20
LR = 0.01


def _setup(name: str, channels: int, size: int, dtype: torch.dtype, steps: int, batch: int):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, channels=channels, image_size=size).to(dtype)
    means = torch.randn(10, channels, size, size, dtype=dtype)  # a learnable signal per class
    labels = [torch.randint(0, 10, (batch,)) for _ in range(steps)]
    return model, [(torch.randn(batch, channels, size, size, dtype=dtype) + 0.5 * means[y], y) for y in labels]


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def _step(net: nn.Module, module: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
          update: bool = True) -> dict[str, Tensor]:
    """One training step; returns all it produced: logits, loss, every gradient, the new weights and buffers."""
    opt.zero_grad()
    logits = net(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    grads = {f"grad of {name}": p.grad.clone() for name, p in module.named_parameters()}
    if update:
        opt.step()
    state = {f"new {name}": v.clone() for name, v in module.state_dict().items() if v.is_floating_point()}
    return {"logits": logits.detach(), "loss": loss.detach(), **grads, **state}


def test_float64_training_tracks_plaintext_step_for_step():
    """ResNet-18 on 28x28 over 20 steps: in float64, rounding is far below what the test can see."""
    model, batches = _setup("resnet18", 1, 28, torch.float64, STEPS, 8)
    plain = copy.deepcopy(model)
    plain_opt = _optimizer(plain)
    plain_losses = [_step(plain, plain, plain_opt, x, y)["loss"].item() for x, y in batches]
    with tempo.local_workers(2, in_process=True) as pool:
        net = protect_quietly(model, pool, scheme="permute", checks=2)
        opt = _optimizer(model)
        tempo_losses = [_step(net, model, opt, x, y)["loss"].item() for x, y in batches]
    for step, (a, b) in enumerate(zip(tempo_losses, plain_losses, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: tempo loss {a} vs plain {b}"


NUDGE = 64 * EPS32  # relative: a few times the rounding a forward pass of the ResNet accumulates (docs/correctness.md)


# Plain float32 from the same state, as is and with its weights nudged three ways: the largest error among
# them is float32's own. The nudges show which gradients hinge on a ReLU whose sign a float32 rounding flips
# (ResNet-18 on 28x28, whose late layers see 2x2 and 1x1 maps); Tempo's rounding, or other kernels, may flip one.
PLAIN_PATHS = ("default", "weights nudged 1", "weights nudged 2", "weights nudged 3")


def _replay(template: nn.Module, before: tuple[dict, dict], x: Tensor, y: Tensor, dtype: torch.dtype,
            path: str = "default") -> dict[str, Tensor]:
    """The same training step in plain PyTorch, from the state `before` (weights, buffers, optimizer)."""
    model = copy.deepcopy(template).to(dtype)
    model.load_state_dict(before[0])  # copies into model's own dtype
    if path.startswith("weights nudged"):
        g = torch.Generator().manual_seed(int(path.split()[-1]))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + NUDGE * torch.randn(p.shape, generator=g, dtype=dtype))
    opt = _optimizer(model)
    opt.load_state_dict(copy.deepcopy(before[1]))  # in float32 it would step `before`'s momentum buffers in place
    return _step(model, model, opt, x.to(dtype), y)


def _train_float32_and_judge(name: str, channels: int, size: int, steps: int, batch: int, workers: int, *,
                             update: Callable[[int], bool] = lambda step: True) -> None:
    """Train under Tempo; judge each step against the same step, from Tempo's state, in float64 and float32."""
    model, batches = _setup(name, channels, size, torch.float32, steps, batch)
    template = copy.deepcopy(model)
    start = time.perf_counter()
    with tempo.local_workers(workers, in_process=True) as pool:
        net = protect_quietly(model, pool, scheme="permute", checks=2)
        opt = _optimizer(model)
        for step, (x, y) in enumerate(batches):
            before = copy.deepcopy((model.state_dict(), opt.state_dict()))
            got = _step(net, model, opt, x, y, update=update(step))
            reference = _replay(template, before, x, y, torch.float64)
            plain = [_replay(template, before, x, y, torch.float32, path) for path in PLAIN_PATHS]
            for what, value in got.items():
                assert_as_exact_as_float32(value, [p[what] for p in plain], reference[what], f"step {step}, {what}")
    print(f"{name}: {steps} tempo steps, judged, in {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize(("name", "channels", "size", "steps", "batch", "workers"), [
    ("resnet18", 1, 28, 5, 32, 2),  # chaotic in float32 (docs/correctness.md)
    ("vit_tiny_patch16_224", 3, 32, 10, 8, 2),  # each step is judged alone: more steps would add time, not rigour
])
def test_float32_training_steps_are_as_exact_as_plain_float32(name, channels, size, steps, batch, workers):
    _train_float32_and_judge(name, channels, size, steps, batch, workers)


@pytest.mark.parametrize("wrong", ["gradients 1.001x", "update skipped"])
def test_a_wrong_tempo_fails_the_float32_bound(wrong, monkeypatch):
    """The bound is not so loose that it passes anything: weight gradients 0.1 % off (made so after Tempo's
    integrity checks, which would catch the lie first), or one missed update, fail it."""
    if wrong.startswith("grad"):
        backward = ShardedOp.backward

        def scaled(self, *args, **kwargs):
            dx, dw = backward(self, *args, **kwargs)
            return dx, None if dw is None else dw * 1.001

        monkeypatch.setattr(ShardedOp, "backward", scaled)
    with pytest.raises(AssertionError, match="step 0, " + ("grad of" if wrong.startswith("grad") else "new")):
        _train_float32_and_judge("resnet18", 1, 28, 1, 32, 2, update=lambda step: wrong.startswith("grad"))


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.resnet50(num_classes=10),
    lambda: torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10),  # vit_b_16-style
    lambda: torchvision.models.mobilenet_v3_small(num_classes=10),  # depthwise convolutions
], ids=["resnet50", "torchvision-vit", "mobilenet_v3_small"])
def test_unmodified_models_match_plain(workers, build):
    """In float64: BatchNorm over tiny late feature maps makes float32 gradients ill-conditioned."""
    module = build().double()
    compare_with_plain(module, [torch.randn(4, 3, 64, 64, dtype=torch.float64)], workers, rtol=1e-5)
