"""``mix``: fresh dense mixing of the contraction and output axes; rows permuted.

For ``Y = X W`` with a fresh permutation A (rows) and fresh invertible M (inner), N (out)::

    X' = A X M,    W' = M⁻¹ W N,    Y' = X' W' = A Y N,      Y  = Aᵀ Y' N⁻¹
    dY' = A dY N⁻ᵀ,  dX' = dY' W'ᵀ = A dX M⁻ᵀ,  dX = Aᵀ dX' Mᵀ
                     dW' = X'ᵀ dY' = Mᵀ dW N⁻ᵀ,  dW = M⁻ᵀ dW' Nᵀ

A permutation hides the order of values, not the values; M and N replace every value by a
secret mixture of many. Each is a product of ``ROUNDS`` stages ``P D B`` followed by a final
permutation: P a random permutation, D random signs with magnitudes log-uniform in
``[1/SPREAD, SPREAD]`` (so M is not orthogonal: Gram matrices and norms change), and B a
block-diagonal random orthogonal matrix with blocks of ``BLOCK`` entries. The permutation
between stages spreads each value over ``BLOCK ** ROUNDS`` entries; applying M costs
O(size x BLOCK x ROUNDS), its condition number is at most ``SPREAD ** (2 ROUNDS)``.

Every matrix acts on row vectors from the right (``v -> v M``) along one tensor axis, whatever
the layout: which of M, M⁻¹, Mᵀ, M⁻ᵀ an operand needs follows from the algebra above
(``_VARIANTS``). Grouped convolutions mix channels within their group (block diagonal M and N)
and permute whole groups identically on both axes, so the worker still runs a grouped convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..products import KeyShape, Layout, Role
from .base import Operand, RandomSource, Scheme
from .permute import inverse_permutation, permute_axes

ROUNDS = 2
BLOCK = 32
SPREAD = 2.0

# (inverse, transpose) of the axis key that each operand's axis is multiplied by
_VARIANTS: dict[tuple[Operand, Role], tuple[bool, bool]] = {
    (Operand.X, Role.INNER): (False, False),  # X M
    (Operand.W, Role.INNER): (True, True),  # M⁻¹ W, i.e. M⁻ᵀ along W's inner axis
    (Operand.W, Role.OUT): (False, False),  # W N
    (Operand.Y, Role.OUT): (True, False),  # Y' N⁻¹
    (Operand.DY, Role.OUT): (True, True),  # dY N⁻ᵀ
    (Operand.DX, Role.INNER): (False, True),  # dX' Mᵀ
    (Operand.DW, Role.INNER): (True, False),  # M⁻ᵀ dW', i.e. M⁻¹ along dW's inner axis
    (Operand.DW, Role.OUT): (False, True),  # dW' Nᵀ
}


def _within_groups(groups: int, per_group: int, rng: RandomSource) -> Tensor:
    """A random permutation of range(groups * per_group) that keeps every index in its group."""
    return torch.cat([g * per_group + rng.permutation(per_group) for g in range(groups)])


def haar_orthogonal(gaussian: Tensor) -> Tensor:
    """Random orthogonal matrices from i.i.d. standard normal ones [..., n, n]: QR with the signs of R's
    diagonal fixed, which makes them Haar-distributed."""
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


@dataclass
class _Stage:
    perm: Tensor  # [n] gather index, within groups
    scale: Tensor  # [n] float64, signs and magnitudes
    blocks: list[Tensor]  # [groups, count, b, b] orthogonal: full blocks, then one remainder block per group
    _cache: dict = field(default_factory=dict, repr=False)

    def factor(self, part: int, inverse: bool, transpose: bool, dtype: torch.dtype) -> Tensor:
        """The block factor of this stage's variant: D B, D⁻¹ B, Bᵀ D⁻¹ or Bᵀ D (see AxisMix.apply)."""
        key = (part, inverse, transpose, dtype)
        if key not in self._cache:
            blocks = self.blocks[part]
            g, count, b, _ = blocks.shape
            start = 0 if part == 0 else self.blocks[0].shape[1] * self.blocks[0].shape[2]
            per_group = self.scale.numel() // g
            d = self.scale.view(g, per_group)[:, start:start + count * b].reshape(g, count, b)
            d = 1 / d if inverse else d
            if inverse == transpose:  # forward order: (v P) D B
                f = d.unsqueeze(-1) * blocks
            else:  # reversed order: v Bᵀ D then P⁻¹
                f = blocks.transpose(-2, -1) * d.unsqueeze(-2)
            self._cache[key] = f.to(dtype)
        return self._cache[key]


class AxisMix:
    """A secret invertible n x n matrix, M = S_1 ... S_R F G: stages, then a within-group permutation F
    and the group order G. It is applied along one axis of a tensor, as `v -> v M` on that axis."""

    def __init__(self, n: int, groups: int, group_order: Tensor, rng: RandomSource):
        self.n, self.groups = n, groups
        per_group = n // groups
        b = min(BLOCK, per_group)
        full, rest = divmod(per_group, b)
        self.stages = []
        for _ in range(ROUNDS):
            magnitude = SPREAD ** (2 * rng.uniform((n,)) - 1)
            blocks = [haar_orthogonal(rng.normal((groups * full, b, b))).view(groups, full, b, b)]
            if rest:
                blocks.append(haar_orthogonal(rng.normal((groups, rest, rest))).view(groups, 1, rest, rest))
            self.stages.append(_Stage(_within_groups(groups, per_group, rng), rng.signs((n,)).double() * magnitude,
                                      blocks))
        self.final = _within_groups(groups, per_group, rng)
        self.group_gather = (group_order.view(-1, 1) * per_group + torch.arange(per_group)).reshape(-1)
        self.tail = self.final[self.group_gather]  # F then G, as one gather
        self._inverse: dict[str, Tensor] = {}

    def _inv(self, name: str, p: Tensor) -> Tensor:
        if name not in self._inverse:
            self._inverse[name] = inverse_permutation(p)
        return self._inverse[name]

    def apply(self, t: Tensor, dim: int, *, inverse: bool, transpose: bool, group_order: bool = True) -> Tensor:
        """`t` with axis `dim` multiplied by M, M⁻¹, Mᵀ or M⁻ᵀ; a new tensor.

        ``group_order=False`` leaves out G: for a grouped weight's inner axis, whose groups are
        ordered by its output rows (the output axis's G moves them).
        """
        shape = t.shape
        v = t.reshape(math.prod(shape[:dim]), self.n, math.prod(shape[dim + 1:]))
        tail = self.tail if group_order else self.final
        forward = inverse == transpose  # M and M⁻ᵀ: stages first; M⁻¹ and Mᵀ: reversed, inverse gathers
        if not forward:
            v = v.index_select(1, self._inv(f"tail{group_order}", tail))
        for i in range(ROUNDS) if forward else reversed(range(ROUNDS)):
            stage = self.stages[i]
            if forward:
                v = self._blocks(v.index_select(1, stage.perm), stage, inverse, transpose)
            else:
                v = self._blocks(v, stage, inverse, transpose).index_select(1, self._inv(f"stage{i}", stage.perm))
        if forward:
            v = v.index_select(1, tail)
        return v.reshape(shape)

    def _blocks(self, v: Tensor, stage: _Stage, inverse: bool, transpose: bool) -> Tensor:
        """v [pre, n, post] times the stage's block-diagonal factor, group by group, block by block."""
        pre, _, post = v.shape
        g = self.groups
        v = v.view(pre, g, self.n // g, post)
        parts, start = [], 0
        for part, blocks in enumerate(stage.blocks):
            count, b = blocks.shape[1], blocks.shape[2]
            chunk = v[:, :, start:start + count * b].reshape(pre, g, count, b, post)
            f = stage.factor(part, inverse, transpose, v.dtype)
            # einsum beat both a broadcast matmul and a grouped 1x1 convolution here (ResNet-18, CPU)
            parts.append(torch.einsum("pgkbs,gkbc->pgkcs", chunk, f).reshape(pre, g, count * b, post))
            start += count * b
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return out.reshape(pre, self.n, post)

    def dense(self) -> Tensor:
        """M itself (n x n, float64): for the leakage suite's ground truth, never sent."""
        return self.apply(torch.eye(self.n, dtype=torch.float64), 1, inverse=False, transpose=False)


@dataclass(frozen=True)
class MixKey:
    perms: dict[Role, Tensor]  # ROW and BATCH: fresh permutations
    inner: AxisMix  # M
    out: AxisMix  # N
    groups: int


class Mix(Scheme):
    name = "mix"
    summary = (f"fresh secret mixing of inner and output axes ({ROUNDS} rounds of permutation, scaling and "
               f"{BLOCK}-blocks), rows permuted")
    updates_commute = False
    exact = False  # unblinding through N⁻¹, Mᵀ, M⁻¹ rounds

    def new_key(self, shape: KeyShape, rng: RandomSource) -> MixKey:
        g = shape.groups
        order = rng.permutation(g)
        perms = {role: rng.permutation(n) for role, n in shape.sizes.items() if role not in (Role.INNER, Role.OUT)}
        return MixKey(perms, AxisMix(shape.sizes[Role.INNER], g, order, rng),
                      AxisMix(shape.sizes[Role.OUT], g, order, rng), g)

    def with_fresh_rows(self, key: MixKey, shape: KeyShape, rng: RandomSource) -> MixKey:
        perms = {role: rng.permutation(n) for role, n in shape.sizes.items() if role not in (Role.INNER, Role.OUT)}
        return MixKey(perms, key.inner, key.out, key.groups)

    def key_tensors(self, key: MixKey) -> dict[str, Tensor]:
        named = {role.value: p for role, p in key.perms.items()}
        named[Role.INNER.value], named[Role.OUT.value] = key.inner.dense(), key.out.dense()
        return named

    def blind(self, t: Tensor, layout: Layout, operand: Operand, key: MixKey) -> Tensor:
        t = self._rows(t.detach(), layout, key, inverse=False)
        return self._mix(t, layout, operand, key, order=(Role.INNER_OF_OUT, Role.INNER, Role.OUT))

    def unblind(self, t: Tensor, layout: Layout, operand: Operand, key: MixKey) -> Tensor:
        t = self._mix(t, layout, operand, key, order=(Role.OUT, Role.INNER_OF_OUT, Role.INNER))
        return self._rows(t, layout, key, inverse=True)

    @staticmethod
    def _rows(t: Tensor, layout: Layout, key: MixKey, *, inverse: bool) -> Tensor:
        perms = [None if role not in key.perms else inverse_permutation(key.perms[role]) if inverse else key.perms[role]
                 for role in layout]
        return permute_axes(t, perms) if any(p is not None for p in perms) else t

    @staticmethod
    def _mix(t: Tensor, layout: Layout, operand: Operand, key: MixKey, order: tuple[Role, ...]) -> Tensor:
        """Mix the inner/output axes of t. A grouped weight's inner axis (rows still in their original
        group order) goes before its output axis, whose group order then moves whole rows."""
        for role in order:
            if role not in layout:
                continue
            dim = layout.index(role)
            axis_role = Role.INNER if role is Role.INNER_OF_OUT else role
            inverse, transpose = _VARIANTS[(operand, axis_role)]
            mixer = key.inner if axis_role is Role.INNER else key.out
            if role is Role.INNER_OF_OUT and key.groups > 1:
                t = _grouped_inner(t, mixer, key.groups, inverse=inverse, transpose=transpose)
            else:
                t = mixer.apply(t, dim, inverse=inverse, transpose=transpose)
        return t


def _grouped_inner(w: Tensor, mixer: AxisMix, groups: int, *, inverse: bool, transpose: bool) -> Tensor:
    """A grouped weight [out, in per group, ...]: row o's inner slice is multiplied by its group's block."""
    out_channels, rest = w.shape[0], w.shape[1:]
    per_out = out_channels // groups
    v = w.reshape(groups, per_out, *rest).transpose(0, 1).contiguous()  # [per_out, groups, in per group, ...]
    v = v.reshape(per_out, groups * rest[0], *rest[1:])
    v = mixer.apply(v, 1, inverse=inverse, transpose=transpose, group_order=False)
    return v.reshape(per_out, groups, *rest).transpose(0, 1).reshape(w.shape)
