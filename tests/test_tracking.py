"""Whole models, step for step: blinded training tracks plaintext training to float rounding."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision

import tempo
from conftest import compare_with_plain, protect_quietly
from tempo.training.models import build_model

STEPS = 20


def _train(model, batches, lr=0.01) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ResNet-18 on 28x28 with small batches is chaotic in float32: plain PyTorch float32 vs float64
# differ by 4-30% in loss within 20 steps (docs/correctness.md), so a float32 comparison at that
# horizon measures the chaos, not Tempo. The ResNet is therefore tracked in float64 over 20 steps
# (and in float32 over the first steps); the ViT is well conditioned and tracked in float32.
# The float32 ResNet runs on one worker: with two, dW is summed from two row shards, a rounding
# change, and perturbing plain float32 weights by 1e-7 relative already moves its loss by 1e-3 at
# step 2 (the same chaos), so that comparison would measure rounding, not Tempo.
@pytest.mark.parametrize(("name", "channels", "size", "dtype", "steps", "batch", "workers"), [
    ("resnet18", 1, 28, torch.float64, STEPS, 8, 2), ("resnet18", 1, 28, torch.float32, 5, 32, 1),
    ("vit_tiny_patch16_224", 3, 32, torch.float32, STEPS, 8, 2),
])
def test_training_tracks_plaintext(name, channels, size, dtype, steps, batch, workers):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, channels=channels, image_size=size).to(dtype)
    means = torch.randn(10, channels, size, size, dtype=dtype)  # a learnable signal per class
    labels = [torch.randint(0, 10, (batch,)) for _ in range(steps)]
    batches = [(torch.randn(batch, channels, size, size, dtype=dtype) + 0.5 * means[y], y) for y in labels]
    plain_losses = _train(copy.deepcopy(model), batches)
    start = time.perf_counter()
    with tempo.local_workers(workers, in_process=True) as pool:
        tempo_losses = _train(protect_quietly(model, pool, scheme="permute", checks=2), batches)
    print(f"{name} {dtype}: {steps} tempo steps in {time.perf_counter() - start:.1f} s")
    for step, (a, b) in enumerate(zip(tempo_losses, plain_losses, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: tempo loss {a} vs plain {b}"


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
