"""Attack 4, undoing hidden-unit permutations: link one op's output units to the next op's input units.

A permutation hides order, not values. Between op l and op l+1 the enclave applies only things the
public architecture names (max-pool 2x2 and flatten, which the worker can apply to Y'_l itself since
spatial axes are not permuted) and a per-unit monotone map (bias add, then ReLU or GELU). So the
multiset of values of op l's output unit i, over all rows and positions, equals that of op l+1's input
unit j up to that map, whatever the two ops' row keys. We compare:

- forward: the top order statistics of Y'_l (pooled) against those of X'_{l+1} mapped back through
  the public activation; their difference is the unit's bias, constant for the right pair;
- backward (ReLU or no activation): the gradient reaching Y'_l (sum-pooled dY'_l) has exactly the
  multiset of dX'_{l+1} masked by X'_{l+1} > 0, with no offset at all;

and solve the assignment. In attention, the q, k, v columns of the qkv product reach the bmm operands
with two heads folded into the bmm batch axis, so each bmm unit (a head dimension) holds two qkv units:
there we test containment of a unit's gradient values in a slot's and assign two units per slot.
Every op invocation has a fresh key, so each step is aligned on its own (option ``alignment_step``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .base import AttackContext, Finding, NotApplicable
from .transcript import OpView, Step, scoring

NAME = "alignment"

_NO_OPS = (nn.Identity, nn.Flatten)
_CHUNK = 1 << 23  # entries of one (src, dst, order statistic) block


@dataclass(frozen=True)
class Link:
    """How op `src`'s output reaches op `dst`'s input, as far as the public architecture says."""

    src: int
    dst: int
    act: str = "identity"  # "identity" | "relu" | "gelu": the per-unit map after the bias add
    pool: bool = False  # max-pool 2x2 on Y'_src
    flatten: bool = False  # (channel, position) features of Y'_src become X'_dst's inner units
    heads: int = 0  # > 0: attention link with this many heads folded into the bmm batch axis
    gelu_approx: str = "none"
    skipped: str | None = None


@dataclass
class PairAlignment:
    """One link's result: for each unit on its `units` side, the matched unit (or slot) on the other."""

    link: Link
    label: str
    match: Tensor | None = None  # [units] matched index
    offset: Tensor | None = None  # per src unit: estimated bias (NaN where the data says nothing)
    evidence: Tensor | None = None  # per matched unit: False where the data could not tell (e.g. a dead ReLU)
    units: str = "src"  # which side `match` is indexed by: "src" (op l's out) or "dst" (op l+1's inner)


def chosen_step(ctx: AttackContext) -> Step:
    """The step the model attacks use: `alignment_step` (default: the last recorded)."""
    return ctx.transcript.steps[ctx.options.get("alignment_step", -1)]


def alignment_of(ctx: AttackContext) -> list[PairAlignment]:
    """All consecutive op pairs of the chosen step, aligned once per context (shared by recovery)."""
    index = ctx.options.get("alignment_step", -1) % len(ctx.transcript.steps)
    key = f"alignment/{index}"
    if key not in ctx.cache:
        step = ctx.transcript.steps[index]
        ctx.cache[key] = [_align(step, link, _label(ctx, link), ctx.seed + n) for n, link in enumerate(links(ctx))]
    return ctx.cache[key]


def _label(ctx: AttackContext, link: Link) -> str:
    return f"{link.src}:{ctx.sites[link.src].name} -> {link.dst}:{ctx.sites[link.dst].name}"


# ---- what connects consecutive ops ------------------------------------------------------------------

def links(ctx: AttackContext) -> list[Link]:
    """One Link per consecutive op pair, from the public architecture and the ops' shapes."""
    model, ops, sites = ctx.new_model(), chosen_step(ctx).ops, ctx.sites
    out = []
    images = ctx.config.batch_size  # public: every worker sees the batch
    for i in range(len(sites) - 1):
        kinds = [s.kind for s in sites[i:i + 4]]
        if ops[i].inside or ops[i + 1].inside:
            out.append(Link(i, i + 1, skipped="one of the two ops ran inside the enclave"))
        elif kinds == ["linear", "bmm", "bmm", "linear"]:
            out.append(_attention_link(i, ops, images))
        elif kinds[:3] == ["bmm", "bmm", "linear"]:
            out.append(Link(i, i + 1, skipped="softmax over the token axis: not a per-unit map"))
        elif kinds[:2] == ["bmm", "linear"] and ops[i].x.shape[0] % images == 0:
            out.append(Link(i, i + 1, heads=ops[i].x.shape[0] // images))
        elif "bmm" in kinds[:2]:
            out.append(Link(i, i + 1, skipped="into or out of a bmm outside the attention pattern"))
        else:
            out.append(_module_link(model, i, sites[i].name, sites[i + 1].name, ops[i], ops[i + 1]))
    return out


def _attention_link(i: int, ops: list[OpView], images: int) -> Link:
    qkv, bmm1 = ops[i], ops[i + 1]
    heads = bmm1.x.shape[0] // images
    if qkv.y.shape[-1] != 3 * heads * bmm1.x.shape[-1]:
        return Link(i, i + 1, skipped="qkv width is not 3 x heads x head_dim")
    return Link(i, i + 1, heads=heads)


def _module_link(model: nn.Module, i: int, a: str, b: str, src: OpView, dst: OpView) -> Link:
    """Model the modules registered between sites `a` and `b`; skip the pair if one is not modelled."""
    act, pool, approx = "identity", False, "none"
    for name, module in _between(model, a, b):
        if isinstance(module, nn.ReLU):
            act = "relu"
        elif isinstance(module, nn.GELU):
            act, approx = "gelu", module.approximate
        elif isinstance(module, nn.MaxPool2d) and module.kernel_size in (2, (2, 2)) and module.stride in (2, (2, 2)):
            pool = True
        elif (isinstance(module, nn.Dropout) and module.p == 0) or isinstance(module, _NO_OPS):
            continue
        else:
            return Link(i, i + 1, skipped=f"{name} ({type(module).__name__}) mixes units or is not modelled")
    y_shape = src.y.shape if not pool else (*src.y.shape[:2], src.y.shape[2] // 2, src.y.shape[3] // 2)
    flatten = len(y_shape) == 4 and dst.x.dim() == 2
    expected = (int(np.prod(y_shape[1:])),) if flatten else tuple(y_shape[1:])
    if tuple(dst.x.shape[1:]) != expected:
        return Link(i, i + 1, skipped=f"shapes {tuple(src.y.shape)} -> {tuple(dst.x.shape)} not modelled")
    return Link(i, i + 1, act=act, pool=pool, flatten=flatten, gelu_approx=approx)


def _between(model: nn.Module, a: str, b: str) -> list[tuple[str, nn.Module]]:
    """Leaf modules registered after module `a` and before module `b` (functional suffixes dropped)."""
    names = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    index = {n: i for i, (n, _) in enumerate(names)}
    return names[index[a.split(":")[0]] + 1:index[b.split(":")[0]]]


# ---- one-to-one links -------------------------------------------------------------------------------

def _align(step: Step, link: Link, label: str, seed: int) -> PairAlignment:
    if link.skipped:
        return PairAlignment(link, label)
    if link.heads and step.ops[link.src].kind == "linear":
        return _align_qkv(step, link, label, seed)
    if link.heads:
        return _align_heads_out(step, link, label, seed)
    src, dst = step.ops[link.src], step.ops[link.dst]
    y, dy = src.y, src.dy
    if link.pool:
        y = F.max_pool2d(y, 2)
        dy = None if dy is None else F.avg_pool2d(dy, 2) * 4  # the one gradient each window passed on
    axis_units = (lambda t: _units(t.flatten(1), 1)) if link.flatten else (lambda t: _units(t, 1))
    s_fwd, t_fwd = axis_units(y), _units(dst.x, 1)
    forward, offset, evidence = _offset_cost(s_fwd, t_fwd, link)
    cost = _normalised(forward)
    if link.act != "gelu" and dy is not None and dst.dx is not None:
        dx = _units(dst.dx * (dst.x > 0) if link.act == "relu" else dst.dx, 1)
        cost = cost + _normalised(_sorted_l1(axis_units(dy), dx))
        evidence |= (dx != 0).any(dim=1)
    match = _solve(cost, 1, seed)
    return PairAlignment(link, label, match, offset[torch.arange(len(match)), match].float(), evidence[match])


def _units(t: Tensor, axis: int) -> Tensor:
    """[units, values]: the entries of `t` grouped by their index along `axis` (row order is lost)."""
    return t.detach().movedim(axis, 0).reshape(t.shape[axis], -1).double()


def _normalised(cost: Tensor) -> Tensor:
    """Cost on a common scale (its median), so forward and backward evidence weigh alike."""
    scale = cost.median()
    return cost / scale if scale > 0 else cost


def _sorted_l1(src: Tensor, dst: Tensor) -> Tensor:
    """Mean |difference| of the sorted values: 0 exactly when two units hold the same multiset."""
    return torch.cdist(src.sort(dim=1).values, dst.sort(dim=1).values, p=1) / src.shape[1]


def _inverse_act(values: Tensor, link: Link) -> tuple[Tensor, Tensor]:
    """Pre-activation values where the public activation is invertible, and how many each unit has.

    `values` is sorted descending per unit; ReLU and GELU are one-to-one above 0, identity everywhere.
    """
    if link.act == "identity":
        return values, torch.full((len(values),), values.shape[1])
    valid = (values > 0).sum(dim=1)
    if link.act == "relu":
        return values, valid
    lo, hi = torch.zeros_like(values), 2 * values.clamp_min(0) + 1e-6  # gelu(z) >= z / 2 for z > 0
    for _ in range(60):  # bisection: GELU is increasing for z > 0
        mid = (lo + hi) / 2
        below = F.gelu(mid, approximate=link.gelu_approx) < values
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2, valid


def _offset_cost(src: Tensor, dst: Tensor, link: Link, top: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """[src, dst] spread and mean of (pre-activation of X' - pooled Y') over the top order statistics.

    For the right pair the difference is the src unit's bias at every order statistic where the
    activation is invertible; dst units with fewer than two such values say nothing (cost 0, and
    False in the third result, per dst unit).
    """
    k = min(top, src.shape[1])
    s = src.sort(dim=1, descending=True).values[:, :k]
    t, valid = _inverse_act(dst.sort(dim=1, descending=True).values[:, :k], link)
    valid = valid.clamp(max=k)
    mask = (torch.arange(k)[None, :] < valid[:, None]).double()
    spread, mean = torch.empty(len(s), len(t), dtype=torch.double), torch.empty(len(s), len(t), dtype=torch.double)
    step = max(1, _CHUNK // (len(s) * k))
    for j in range(0, len(t), step):
        d = t[None, j:j + step] - s[:, None]  # [src, chunk, k]
        m, n = mask[None, j:j + step], valid[j:j + step].clamp_min(1).double()
        mean[:, j:j + step] = (d * m).sum(-1) / n
        spread[:, j:j + step] = (((d - mean[:, j:j + step, None]) * m) ** 2).sum(-1).div(n).sqrt()
    spread[:, valid < 2] = 0
    mean[:, valid == 0] = float("nan")
    return spread, mean, valid >= 2


# ---- attention: heads folded into the bmm batch axis -------------------------------------------------

def _align_qkv(step: Step, link: Link, label: str, seed: int) -> PairAlignment:
    """qkv columns -> slots (q: bmm1 X inner, k: bmm1 W inner, v: bmm2 W out), `heads` units per slot.

    The gradient dY'_qkv of a q column is scale x dX' of the bmm1 X operand (timm scales q before the
    product), of a k or v column exactly the operand's gradient; forward values carry an unknown bias.
    Slots are numbered q 0..D-1, k D..2D-1, v 2D..3D-1 in the bmm ops' blinded orders.
    """
    qkv, bmm1, bmm2 = step.ops[link.src], step.ops[link.src + 1], step.ops[link.src + 2]
    if qkv.dy is None or bmm1.dx is None or bmm1.dw is None or bmm2.dw is None:
        return PairAlignment(link, label)
    scale = bmm1.x.shape[-1] ** -0.5
    slots = torch.cat([_units(bmm1.dx * scale, 2), _units(bmm1.dw, 1), _units(bmm2.dw, 2)])
    units = _units(qkv.dy, 1)
    match = _solve(_normalised(_containment(units, slots)), link.heads, seed)
    return PairAlignment(link, label, match, evidence=(units != 0).any(dim=1), units="src")


def _align_heads_out(step: Step, link: Link, label: str, seed: int) -> PairAlignment:
    """attn.v output (heads folded into batch) -> proj's inner units (heads merged): exact values both ways."""
    bmm, proj = step.ops[link.src], step.ops[link.dst]
    units = _units(proj.x, 1)
    cost = _normalised(_containment(units, _units(bmm.y, 2)))
    if bmm.dy is not None and proj.dx is not None:
        cost = cost + _normalised(_containment(_units(proj.dx, 1), _units(bmm.dy, 2)))
    return PairAlignment(link, label, _solve(cost, link.heads, seed), evidence=units.std(dim=1) > 0, units="dst")


def _containment(units: Tensor, slots: Tensor) -> Tensor:
    """[units, slots] mean distance from each of a unit's values to the nearest value of a slot."""
    cost = torch.empty(len(units), len(slots), dtype=torch.double)
    units = units.contiguous()
    for j, values in enumerate(slots.sort(dim=1).values):
        at = torch.searchsorted(values.contiguous(), units).clamp(1, len(values) - 1)
        nearest = torch.minimum((units - values[at - 1]).abs(), (values[at] - units).abs())
        cost[:, j] = nearest.mean(dim=1)
    return cost


def _solve(cost: Tensor, capacity: int, seed: int) -> Tensor:
    """Minimum-cost assignment of rows to columns, `capacity` rows per column (columns repeated).

    Columns are tried in a seeded random order, so units the data cannot tell apart (equal costs) are
    matched at random rather than in their given order, which for the `none` scheme is the true one.
    """
    order = torch.randperm(cost.shape[1], generator=torch.Generator().manual_seed(seed))
    rows, cols = linear_sum_assignment(cost[:, order].repeat_interleave(capacity, dim=1).numpy())
    return order[torch.as_tensor(cols[np.argsort(rows)] // capacity)]


# ---- scoring (reads the keys) ------------------------------------------------------------------------

@scoring()
def true_match(step: Step, pair: PairAlignment) -> Tensor:
    """SCORING ONLY: the right `match` for `pair`, from the keys."""
    link, ops = pair.link, step.ops
    src, dst = ops[link.src], ops[link.dst]
    if link.heads and src.kind == "linear":
        bmm1, bmm2 = ops[link.src + 1], ops[link.src + 2]
        d = bmm1.x.shape[-1]
        plain = step.key(src, "out", src.y.shape[-1])
        part, dim = plain // (link.heads * d), plain % d
        inv_qk, inv_v = _inverse(step.key(bmm1, "inner", d)), _inverse(step.key(bmm2, "out", d))
        return part * d + torch.where(part < 2, inv_qk[dim], inv_v[dim])
    if link.heads:
        d = src.y.shape[-1]
        plain = step.key(dst, "inner", dst.x.shape[1])
        return _inverse(step.key(src, "out", d))[plain % d]
    channels = src.y.shape[1]
    plain = step.key(src, "out", channels)
    if link.flatten:
        positions = dst.x.shape[1] // channels
        plain = (plain[:, None] * positions + torch.arange(positions)).flatten()
    return _inverse(step.key(dst, "inner", dst.x.shape[1]))[plain]


def _inverse(perm: Tensor) -> Tensor:
    return torch.argsort(perm)


def _slots(step: Step, pair: PairAlignment) -> int:
    """How many choices a unit had: the other side's units (or slots)."""
    link, ops = pair.link, step.ops
    if link.heads and ops[link.src].kind == "linear":
        return 3 * ops[link.src + 1].x.shape[-1]
    if link.heads:
        return ops[link.src].y.shape[-1]
    return ops[link.dst].x.shape[1]


def run(ctx: AttackContext) -> Finding:
    if ctx.config.unfold_convs:
        raise NotApplicable("the links are modelled between convolutions, not between unfolded convolutions")
    step = chosen_step(ctx)
    details: dict = {"step": step.step, "pairs": {}}
    right = total = chance = 0.0
    seen = seen_right = 0
    for pair in alignment_of(ctx):
        if pair.match is None or pair.evidence is None:
            details["pairs"][pair.label] = f"skipped: {pair.link.skipped or 'no backward pass recorded'}"
            continue
        ok = pair.match == true_match(step, pair)
        n, slots, evident = len(pair.match), _slots(step, pair), int(pair.evidence.sum())
        right, total, chance = right + int(ok.sum()), total + n, chance + n / slots
        seen, seen_right = seen + evident, seen_right + int(ok[pair.evidence].sum())
        details["pairs"][pair.label] = {
            "link": _describe(pair.link), "units": n, "choices": slots, "fraction_correct": float(ok.double().mean()),
            "units_with_evidence": evident, "fraction_correct_with_evidence": float(ok[pair.evidence].double().mean())
            if evident else None}
    details["units_with_evidence"] = seen
    details["fraction_correct_with_evidence"] = seen_right / max(seen, 1)
    return Finding(NAME, "fraction of hidden units matched to the next op's input units", right / max(total, 1),
                   chance / max(total, 1), details)


def _describe(link: Link) -> str:
    if link.heads:
        return f"attention, {link.heads} heads folded into the bmm batch axis (2-to-1 slots)"
    return "+".join(p for p, on in (("maxpool2", link.pool), ("flatten", link.flatten), (link.act, True)) if on)
