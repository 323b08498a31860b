"""``permute``: the paper's MM-obfuscation with fresh secret permutations per op invocation.

For ``Y = X W`` with permutations A (rows), P (inner), B (out)::

    X' = A X P,   W' = Pᵀ W B,   Y' = X' W' = A Y B,   Y = Aᵀ Y' Bᵀ
    dY' = A dY B, dX' = dY' W'ᵀ = A dX P,   dW' = X'ᵀ dY' = Pᵀ dW B

Every (un)blinding is a gather: O(size), exact in floating point. Grouped convolutions permute
whole groups (the same group order on input and output channels) and the channels inside each
group independently; the weight's inner axis is then re-indexed per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..products import KeyShape, Layout, Role
from .base import Operand, RandomSource, Scheme


@dataclass(frozen=True)
class PermutationKey:
    perms: dict[Role, Tensor]
    inner_of_out: Tensor | None  # [out, in per group] gather index for grouped weights, else None

    def inverse(self, role: Role) -> Tensor:
        p = self.perms[role]
        inv = torch.empty_like(p)
        inv[p] = torch.arange(p.numel())
        return inv


def _grouped_perm(group_order: Tensor, per_group: int, rng: RandomSource) -> Tensor:
    return torch.cat([g * per_group + rng.permutation(per_group) for g in group_order.tolist()])


class Permute(Scheme):
    name = "permute"
    summary = "fresh secret permutations of rows, inner and output axes (MM-obfuscation)"

    def new_key(self, shape: KeyShape, rng: RandomSource) -> PermutationKey:
        g = shape.groups
        perms = {role: rng.permutation(n) for role, n in shape.sizes.items()
                 if role not in (Role.INNER, Role.OUT) or g == 1}
        inner_of_out = None
        if g > 1:
            order = rng.permutation(g)
            cpg, opg = shape.sizes[Role.INNER] // g, shape.sizes[Role.OUT] // g
            perms[Role.INNER] = _grouped_perm(order, cpg, rng)
            perms[Role.OUT] = _grouped_perm(order, opg, rng)
            local = (perms[Role.INNER] % cpg).view(g, 1, cpg)
            inner_of_out = local.expand(g, opg, cpg).reshape(g * opg, cpg)
        return PermutationKey(perms, inner_of_out)

    def blind(self, t: Tensor, layout: Layout, operand: Operand, key: PermutationKey) -> Tensor:
        for dim, role in enumerate(layout):
            t = self._apply(t, dim, role, key, inverse=False)
        return t

    def unblind(self, t: Tensor, layout: Layout, operand: Operand, key: PermutationKey) -> Tensor:
        for dim in reversed(range(len(layout))):
            t = self._apply(t, dim, layout[dim], key, inverse=True)
        return t

    @staticmethod
    def _apply(t: Tensor, dim: int, role: Role | None, key: PermutationKey, *, inverse: bool) -> Tensor:
        if role is None:
            return t
        if role is Role.INNER_OF_OUT:
            if key.inner_of_out is None:  # ungrouped: an ordinary inner permutation
                role = Role.INNER
            else:
                index = key.inner_of_out.view(*key.inner_of_out.shape, *([1] * (t.dim() - 2)))
                index = index.expand_as(t).to(t.device)
                if inverse:
                    return torch.empty_like(t).scatter_(dim, index, t)
                return t.gather(dim, index)
        perm = key.inverse(role) if inverse else key.perms[role]
        return t.index_select(dim, perm.to(t.device))
