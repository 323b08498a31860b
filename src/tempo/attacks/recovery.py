"""The best model the worker can assemble from one step's transcript (shared by attacks 1, 2 and 5).

Every op weight is the W' the worker saw at the chosen step (``alignment_step``, default the last).
W' is the true weight with its output axis and inner axis permuted by that op's key, so the pieces fit
together only once each hidden layer has one basis: we take op l's blinded output order as the basis
of the layer between op l and op l+1 and permute op l+1's inner axis by the alignment (attack 4).
Biases come from the alignment's offset estimates where it has them. What the worker never saw in any
form (norm parameters, embeddings, class token, the last layer's bias, ...) keeps the fresh init.

Two axes are not hidden-unit symmetries. The first op's inner axis (input channels) is left in its
blinded order: for 1-channel images there is nothing to undo. The last op's output axis is the class
axis: we map output units to classes with the attacker's labelled public set (``ctx.aux()``), by
Hungarian matching on the confusion matrix of the model's predictions.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .alignment import PairAlignment, alignment_of, chosen_step
from .base import AttackContext
from .transcript import Step, scoring


def leaked_model(ctx: AttackContext) -> nn.Module:
    """The worker's model: blinded weights in one consistent basis, classes mapped on the aux set (cached)."""
    if "recovery/leaked" not in ctx.cache:
        model = _assembled(ctx)
        ctx.cache["recovery/class_units"] = assign_classes(ctx, model)
        ctx.cache["recovery/leaked"] = model.eval()
    return ctx.cache["recovery/leaked"]


def _assembled(ctx: AttackContext) -> nn.Module:
    """The leaked weights and bias estimates in a fresh model, last op's rows still in blinded order."""
    model = ctx.new_model()
    with torch.no_grad():
        for name, value in (leaked_weights(ctx) | leaked_biases(ctx)).items():
            model.get_parameter(name).copy_(value)
    return model


def weight_sites(ctx: AttackContext) -> list[int]:
    """Indices of the ops whose W is a parameter."""
    return [i for i, site in enumerate(ctx.sites) if site.weight is not None]


def seen_weight_sites(ctx: AttackContext) -> list[int]:
    """The weight ops the workers saw: the weights recovery rebuilds (the rest keep the fresh init)."""
    seen = chosen_step(ctx).seen
    return [i for i in weight_sites(ctx) if i in seen]


def _inner_links(ctx: AttackContext) -> dict[int, PairAlignment]:
    """For each weight op, the one-to-one alignment that puts its inner axis in its producer's basis."""
    return {p.link.dst: p for p in alignment_of(ctx) if p.match is not None and not p.link.heads
            and ctx.sites[p.link.src].weight and ctx.sites[p.link.dst].weight}


def leaked_weights(ctx: AttackContext) -> dict[str, Tensor]:
    """W' of every weight op, inner axes re-indexed into the producer's blinded output order.

    The last op's rows are still in blinded order here; :func:`assign_classes` maps them to classes.
    """
    step, links = chosen_step(ctx), _inner_links(ctx)
    out = {}
    for i in seen_weight_sites(ctx):
        w = step.ops[i].w.detach().clone()
        if i in links:
            w = w[:, links[i].match]  # basis feature f of the producer sits at inner index match[f]
        out[ctx.sites[i].weight] = w
    return out


def leaked_biases(ctx: AttackContext) -> dict[str, Tensor]:
    """Bias estimates from the alignment offsets (per channel: mean over positions after a flatten)."""
    params = dict(ctx.new_model().named_parameters())
    out = {}
    for pair in _inner_links(ctx).values():
        name = ctx.sites[pair.link.src].weight.removesuffix(".weight") + ".bias"
        if name not in params or pair.offset is None:
            continue
        offset = pair.offset.view(len(params[name]), -1)
        known = ~offset.isnan()
        bias = torch.where(known, offset, 0).sum(dim=1) / known.sum(dim=1).clamp_min(1)
        out[name] = torch.where(known.any(dim=1), bias, params[name].detach())
    return out


def assign_classes(ctx: AttackContext, model: nn.Module) -> Tensor:
    """Reorder the last op's output units into classes; returns the unit chosen for each class.

    The attacker runs `model` on its labelled aux set and solves the assignment that maximises the
    number of aux images whose predicted unit is mapped to their label. Used for the baseline too.
    """
    images, labels = ctx.aux()
    name = ctx.sites[weight_sites(ctx)[-1]].weight.removesuffix(".weight")
    layer = model.get_submodule(name)
    classes = int(labels.max()) + 1
    with torch.no_grad():
        predicted = model.eval()(images).argmax(dim=1)
        confusion = torch.zeros(layer.weight.shape[0], classes)
        confusion.index_put_((predicted, labels), torch.ones(len(labels)), accumulate=True)
        units, label_of = linear_sum_assignment(-confusion.numpy())
        unit_of = torch.as_tensor(units[torch.as_tensor(label_of).argsort()])
        layer.weight.copy_(layer.weight[unit_of])
        if layer.bias is not None:
            layer.bias.copy_(layer.bias[unit_of])
    return unit_of


# ---- scoring and diagnostics (read the keys and the true parameters) ---------------------------------

@scoring()
def attacker_basis(ctx: AttackContext) -> dict[str, tuple[Tensor, Tensor]]:
    """SCORING ONLY: per weight, the plain indices of the attacker's (output, inner) basis, from the keys.

    Output axis: the op's blinded order (its key), classes for the last op. Inner axis: the producer's
    blinded output order (the plain feature of flattened (channel c, position p) being c * positions + p),
    the producer being the aligned op or else the previous weight op of matching width; the op's own
    blinded inner order only where there is no such op (the first op's input channels, attention's proj).
    """
    step, links = chosen_step(ctx), _inner_links(ctx)
    sites, last = seen_weight_sites(ctx), weight_sites(ctx)[-1]
    out = {}
    for i in sites:
        op = step.ops[i]
        rows = torch.arange(op.w.shape[0]) if i == last else step.key(op, "out", op.w.shape[0])
        src = links[i].link.src if i in links else _previous_of_width(step, sites, i)
        if src is None:
            inner = step.key(op, "inner", op.w.shape[1])
        else:
            plain = step.key(step.ops[src], "out", step.ops[src].w.shape[0])
            positions = op.w.shape[1] // len(plain)
            inner = (plain[:, None] * positions + torch.arange(positions)).flatten()
        out[ctx.sites[i].weight] = (rows, inner)
    return out


def _previous_of_width(step: Step, sites: list[int], i: int) -> int | None:
    """The previous seen weight op if its output is as wide as op i's inner axis (e.g. across a residual and
    LayerNorm), so an unaligned inner axis is scored against the basis the attacker should have matched."""
    before = [k for k in sites if k < i]
    if before and step.ops[before[-1]].w.shape[0] == step.ops[i].w.shape[1]:
        return before[-1]
    return None


@scoring()
def true_weights_in_basis(ctx: AttackContext) -> dict[str, Tensor]:
    """SCORING ONLY: the true weights of the chosen step expressed in the attacker's basis."""
    params = chosen_step(ctx).truth.params
    return {name: params[name][rows][:, inner] for name, (rows, inner) in attacker_basis(ctx).items()}


@scoring()
def true_model(ctx: AttackContext) -> nn.Module:
    """SCORING ONLY: the public architecture with the true parameters at the start of the chosen step."""
    model = ctx.new_model()
    model.load_state_dict(chosen_step(ctx).truth.params, strict=False)
    return model.eval()


@scoring()
def leaked_model_with_enclave_params(ctx: AttackContext) -> nn.Module:
    """DIAGNOSTIC, NOT AN ATTACK: the leaked model with every never-sent parameter taken from the truth.

    Biases (in the attacker's basis), norms, embeddings and the class token are what the enclave keeps;
    filling them in gives an upper bound on what the blinded products alone reveal. Classes are then
    assigned on the aux set as for the leaked model.
    """
    model = _assembled(ctx)
    step, basis = chosen_step(ctx), attacker_basis(ctx)
    last = weight_sites(ctx)[-1]
    rows = {name: rows for name, (rows, _) in basis.items()}
    if not step.ops[last].inside:  # else its true weight is filled in, like every parameter never sent
        rows[ctx.sites[last].weight] = step.key(step.ops[last], "out", step.ops[last].w.shape[0])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in rows or name not in step.truth.params:
                continue
            weight = name.removesuffix(".bias") + ".weight"
            param.copy_(step.truth.params[name][rows[weight]] if weight in rows else step.truth.params[name])
    assign_classes(ctx, model)
    return model.eval()
