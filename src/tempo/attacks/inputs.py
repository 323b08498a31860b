"""Attack 6, input recovery: rebuild the training images from the first op's blinded input X'.

The worker sees the first op's X' every step. Under the permute scheme it is the input batch with
its rows (batch order) and its inner axis permuted. For a convolution the inner axis is the image
channels and the spatial layout is left as it is: for single-channel images (Fashion-MNIST) under a
conv first op, permute hides nothing but the batch order, so every training image is seen in the
clear. With several channels the worker undoes the channel permutation by matching each channel's
statistics (mean, std, mean image) to those of its own public data. If the first op is a linear
layer on flattened pixels, the inner axis is the pixels: matching per-pixel mean and std against
public data gives a first guess, which the pixels' correlations (from the batch itself, against
those of public data) then refine. Batch order does not matter: the attacker wants the set of
images. Scoring pairs each recovered image with its true input through the row key.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.utils import save_image

from .base import AttackContext, Finding, NotApplicable
from .transcript import OpView, scoring

NAME = "inputs"

_FIGURE_IMAGES = 8
_PSNR_CAP = 120.0  # dB: what an exact copy scores (its error is zero)


def match_units(blinded: Tensor, public: Tensor) -> np.ndarray:
    """For each blinded unit (a row of features), the public unit it is: a minimum distance assignment.

    Features are standardised per column over both sides together, so means and stds weigh alike.
    """
    both = torch.cat([blinded, public]).double()
    scale = both.std(dim=0).clamp_min(1e-12)
    a, b = (blinded.double() - both.mean(dim=0)) / scale, (public.double() - both.mean(dim=0)) / scale
    rows, cols = linear_sum_assignment(torch.cdist(a, b).numpy())
    match = np.empty(len(blinded), dtype=np.int64)
    match[rows] = cols
    return match


def _correlation(x: Tensor) -> Tensor:
    """Correlation matrix of the columns of a [N, P] batch (constant columns correlate with nothing)."""
    x = x.double() - x.double().mean(dim=0)
    x = x / x.norm(dim=0).clamp_min(1e-12)
    return x.T @ x


def refine_by_correlation(blinded: Tensor, public: Tensor, match: np.ndarray, rounds: int = 20) -> np.ndarray:
    """Improve a pixel assignment with the pixels' correlations (neighbours move together).

    Each round reads every blinded pixel's correlations with the others through the current
    assignment, as a row in public pixel order, and re-solves the assignment against the public
    data's correlation rows: a linearised graph match, stopped when the assignment settles.
    """
    ours, theirs = _correlation(blinded), _correlation(public)
    for _ in range(rounds):
        placed = torch.empty_like(ours)
        placed[:, torch.from_numpy(match)] = ours
        rows, cols = linear_sum_assignment((placed @ theirs.T).numpy(), maximize=True)
        new = np.empty_like(match)
        new[rows] = cols
        if np.array_equal(new, match):
            break
        match = new
    return match


def _channel_features(x: Tensor) -> Tensor:
    """Per channel of a [N, C, H, W] batch: its mean, std and mean image, one row per channel."""
    per_channel = x.transpose(0, 1).flatten(1)
    mean_image = x.mean(dim=0).flatten(1)
    return torch.cat([per_channel.mean(1, keepdim=True), per_channel.std(1, keepdim=True), mean_image], dim=1)


def _pixel_features(x: Tensor) -> Tensor:
    """Per column of a [N, P] batch: its mean and std, one row per pixel."""
    return torch.stack([x.mean(dim=0), x.std(dim=0)], dim=1)


def recover(op: OpView, aux: Tensor) -> Tensor:
    """The first op's input batch, in the public layout of `aux` ([N, C, H, W]), in the worker's row order."""
    x = op.x.detach()
    if op.kind == "conv2d" and x.dim() == 4 and x.shape[1:] == aux.shape[1:]:
        channel = match_units(_channel_features(x), _channel_features(aux))
        out = torch.empty_like(x)
        out[:, channel] = x
        return out
    if op.kind == "linear" and x.dim() == 2 and x.shape[1] == aux[0].numel():
        public = aux.flatten(1)
        pixel = refine_by_correlation(x, public, match_units(_pixel_features(x), _pixel_features(public)))
        out = torch.empty_like(x)
        out[:, pixel] = x
        return out.reshape(-1, *aux.shape[1:])
    raise NotApplicable(f"input recovery needs a conv2d on the images or a linear layer on their flattened pixels; "
                     f"the first op is {op.kind} on {tuple(x.shape)} (images are {tuple(aux.shape[1:])})")


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: Tensor, b: Tensor, data_range: float) -> Tensor:
    """Per-image SSIM of [N, C, H, W] batches (Wang et al. 2004: 11x11 gaussian window, sigma 1.5)."""
    a, b = a.double(), b.double()
    channels = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size).expand(channels, 1, size, size)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(dim=1)


def psnr(a: Tensor, b: Tensor, data_range: float) -> Tensor:
    """Per-image PSNR in dB, capped at _PSNR_CAP (an exact copy)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    floor = data_range**2 * 10 ** (-_PSNR_CAP / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def figure(ctx: AttackContext, truth: Tensor, recovered: Tensor, attack: str = NAME) -> str:
    """A grid: true inputs on top, their recoveries below; the path relative to the report."""
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", ctx.transcript.label).strip("-")
    name = f"{attack}_{label}.png"
    n = min(_FIGURE_IMAGES, len(truth))
    grid = torch.cat([truth[:n], recovered[:n]])
    if grid.shape[1] not in (1, 3):
        grid = grid[:, :1]
    lo, hi = float(truth.min()), float(truth.max())
    save_image(grid.float(), ctx.figure_path(name), nrow=n, normalize=True, value_range=(lo, hi), padding=1)
    return f"figures/{name}"


def run(ctx: AttackContext) -> Finding:
    aux, _ = ctx.aux()
    steps = ctx.transcript.steps
    recovered = torch.cat([recover(step.ops[0], aux) for step in steps])
    with scoring():  # each step's true inputs in the order the worker saw them (the first op's row key)
        truth = torch.cat([step.truth.inputs[step.key(step.ops[0], "row", len(step.truth.inputs))] for step in steps])
    truth = truth.to(recovered.dtype)
    data_range = float(truth.max() - truth.min()) or 1.0
    guess = aux.mean(dim=0, keepdim=True).expand_as(truth).to(truth.dtype)
    value, baseline = ssim(recovered, truth, data_range), ssim(guess, truth, data_range)
    details = {"images": len(truth), "first_op": steps[0].ops[0].kind, "psnr_db": float(psnr(recovered, truth,
               data_range).mean()), "baseline_psnr_db": float(psnr(guess, truth, data_range).mean()),
               "ssim_min": float(value.min()), "psnr_cap_db": _PSNR_CAP, "aux_images": len(aux),
               "baseline_guess": "the mean of the attacker's public images, for every input"}
    return Finding(NAME, "mean SSIM of the recovered training inputs", float(value.mean()), float(baseline.mean()),
                   details, {"true (top) vs recovered (bottom) inputs": figure(ctx, truth, recovered)})
