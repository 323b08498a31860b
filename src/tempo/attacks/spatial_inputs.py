"""Attack 9, inputs through space: rebuild the training images from the *second* convolution's inputs.

With the first product kept in the enclave (the anchors default), no raw input reaches a worker,
but the second convolution's input X' (the first layer's features, channels blinded) does, and
blinding acts on channels only: each sample's energy map, the norm over channels at every
position, keeps the image's layout. The attacker learns how energy maps relate to images from its
own public images by ridge regression from standardised maps to pixels, and applies that to the maps
it sees. It does not know the trained first layer, so it marginalises over it: its public images go
through ``SURROGATES`` copies of the public architecture, each with its own random initialisation,
and one decoder is fitted to all of them (a decoder fitted through one random first layer learns that
layer's quirks and transfers poorly to the trained one). Scored like ``inputs``: mean SSIM against the true images,
beside the mean public image as the guess. It needs a convolution on the images followed by a
second convolution; other models make it fail, as reported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .alignment import chosen_step
from .base import AttackContext, Finding, NotApplicable
from .inputs import figure, ssim
from .samples import energy_map
from .transcript import scoring

NAME = "spatial_inputs"
SURROGATES = 16  # random first layers the decoder is fitted across
_RIDGE = 1e-1  # relative to the mean feature energy


class _SecondConvInput(TorchFunctionMode):
    """Captures the input of the second F.conv2d call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.captured = 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.conv2d:
            self.calls += 1
            if self.calls == 2:
                self.captured = args[0].detach()
        return func(*args, **(kwargs or {}))


def run(ctx: AttackContext) -> Finding:
    step = chosen_step(ctx)
    ops = step.ops
    if len(ops) < 2 or ops[0].kind != "conv2d" or ops[1].kind != "conv2d":
        raise NotApplicable("needs a convolution on the images followed by a second convolution")
    aux, _ = ctx.aux()
    features = torch.cat([_maps(ctx.new_model(seed=ctx.seed + k), aux, ops[1].x.shape[1:])
                          for k in range(SURROGATES)])
    pixels = aux.double().flatten(1).repeat(SURROGATES, 1)
    gram = features.T @ features
    ridge = _RIDGE * float(gram.diagonal().mean()) * torch.eye(len(gram), dtype=torch.float64)
    decoder = torch.linalg.solve(gram + ridge, features.T @ pixels)
    seen = torch.cat([energy_map(ops[1].x), torch.ones(len(ops[1].x), 1, dtype=torch.float64)], 1)
    recovered = (seen @ decoder).reshape(-1, *aux.shape[1:])
    with scoring():  # the true images in the order the worker saw the second op's rows
        truth = step.truth.inputs[step.key(ops[1], "row", len(step.truth.inputs))].double()
    data_range = float(truth.max() - truth.min()) or 1.0
    guess = aux.double().mean(dim=0, keepdim=True).expand_as(truth)
    value, baseline = ssim(recovered, truth, data_range), ssim(guess, truth, data_range)
    return Finding(NAME, "mean SSIM of training inputs rebuilt from the second convolution's energy maps",
                   float(value.mean()), float(baseline.mean()),
                   {"images": len(truth), "aux_images": len(aux), "map": list(ops[1].x.shape[2:]),
                    "surrogate_first_layers": SURROGATES,
                    "baseline_guess": "the mean of the attacker's public images, for every input"},
                   {"true (top) vs rebuilt (bottom) inputs": figure(ctx, truth, recovered, NAME)})


def _maps(model: torch.nn.Module, images: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The energy maps (plus a constant feature) of `images` at `model`'s second convolution."""
    probe = _SecondConvInput()
    with torch.no_grad(), probe:
        model.train()(images)
    if probe.captured is None or probe.captured.shape[1:] != shape:
        raise ValueError("the public model's second convolution does not match the recorded one")
    return torch.cat([energy_map(probe.captured), torch.ones(len(images), 1, dtype=torch.float64)], 1)
