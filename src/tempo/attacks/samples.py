"""Attack 8, sample linking: follow each training sample from one convolution to the next within a step.

Every op invocation permutes its rows (the batch) with a fresh key, so which row of the next op's
input is which row of this op's output is secret. Blinding schemes mix or permute *channels*; a
convolution's spatial positions stay in place, so each sample's energy map (the norm over channels
at every position) survives the key up to the key's distortion of norms, and survives pooling up
to resolution. Fingerprint: that map, pooled to the smaller grid of the two ops and standardised;
rows are paired by a maximum-correlation assignment. Linked samples let a worker pool what
different ops reveal about one training example. Only convolution-to-convolution pairs have such
a map (a linear layer's inner axis is mixed or permuted as a whole); a model without one (a ViT
has a single convolution) makes the attack fail, as reported.

Scoring reads each op's row key; the headline is the mean over consecutive convolution pairs of
the fraction of samples linked to themselves. Random guess: 1/batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .alignment import chosen_step
from .base import AttackContext, Finding, NotApplicable, scoring
from .gram import assign

NAME = "samples"


def energy_map(x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """[B, C, H, W] -> each sample's norm over channels at every position (pooled to `size` if given),
    flattened and standardised per sample: [B, positions]. Channel keys leave it in place."""
    e = x.double().pow(2).sum(1, keepdim=True).sqrt()
    if size is not None:
        e = F.adaptive_avg_pool2d(e, size)
    e = e.flatten(1)
    e = e - e.mean(1, keepdim=True)
    return e / e.norm(dim=1, keepdim=True).clamp_min(1e-300)


def energy_maps(out: Tensor, nxt: Tensor) -> tuple[Tensor, Tensor]:
    """Energy maps of a convolution's output and the next one's input, on the smaller grid of the two."""
    size = (min(out.shape[2], nxt.shape[2]), min(out.shape[3], nxt.shape[3]))
    return energy_map(out, size), energy_map(nxt, size)


def link(out: Tensor, nxt: Tensor) -> Tensor:
    """For each row of `out`, the row of `nxt` judged to be the same sample."""
    a, b = energy_maps(out, nxt)
    return assign(-(a @ b.T))


def run(ctx: AttackContext) -> Finding:
    step = chosen_step(ctx)
    pairs = {}
    for i in range(len(step.ops) - 1):
        a, b = step.ops[i], step.ops[i + 1]
        if a.inside or b.inside or a.kind != "conv2d" or b.kind != "conv2d" or b.x.shape[0] != a.y.shape[0]:
            continue
        batch = a.y.shape[0]
        match = link(a.y, b.x)
        with scoring():
            truth_a, truth_b = step.key(a, "row", batch), step.key(b, "row", batch)
            linked = float((truth_a == truth_b[match]).double().mean())
            pairs[f"{step.op_truth(a).name} -> {step.op_truth(b).name}"] = {"linked": linked, "batch": batch}
    if not pairs:
        raise NotApplicable("no two consecutive convolutions the workers saw: no spatial fingerprint to link "
                            "samples by")
    mean = sum(p["linked"] for p in pairs.values()) / len(pairs)
    baseline = sum(1 / p["batch"] for p in pairs.values()) / len(pairs)
    return Finding(NAME, "fraction of samples linked from an op's output rows to the next op's input rows", mean,
                   baseline, {"pairs": pairs})
