"""``permute``: the paper's MM-obfuscation with fresh secret permutations per op invocation.

For ``Y = X W`` with permutations A (rows), P (inner), B (out)::

    X' = A X P,   W' = Pᵀ W B,   Y' = X' W' = A Y B,   Y = Aᵀ Y' Bᵀ
    dY' = A dY B, dX' = dY' W'ᵀ = A dX P,   dW' = X'ᵀ dY' = Pᵀ dW B

Every (un)blinding is a gather: O(size), exact in floating point. Grouped convolutions permute
whole groups (the same group order on input and output channels) and the channels inside each
group independently; the weight's inner axis is then re-indexed per output channel.

The permutations of all axes of one tensor are applied together: the permuted leading axes are
merged into one row index (the Kronecker product of their permutations) and gathered with a
single ``index_select`` of contiguous rows; only a permuted last axis needs a second pass, as a
2-D column ``index_select`` (both are fast paths; ``index_select`` on an inner axis of a 3-D or
4-D tensor is not).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..products import KeyShape, Layout, Role
from .base import Operand, RandomSource, Scheme


@dataclass(frozen=True)
class PermutationKey:
    perms: dict[Role, Tensor]
    inner_of_out: Tensor | None  # [out, in per group] gather index for grouped weights, else None
    _inverses: dict[Role, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def inverse(self, role: Role) -> Tensor:
        """The inverse permutation of `role`'s, computed once per key."""
        inv = self._inverses.get(role)
        if inv is None:
            inv = self._inverses[role] = inverse_permutation(self.perms[role])
        return inv


def inverse_permutation(p: Tensor) -> Tensor:
    """q with q[p[i]] = i."""
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel(), device=p.device)
    return inv


def _grouped_perm(group_order: Tensor, per_group: int, rng: RandomSource) -> Tensor:
    return torch.cat([g * per_group + rng.permutation(per_group) for g in group_order.tolist()])


def _merged_index(shape: torch.Size, perms: list[Tensor | None], device: torch.device) -> Tensor:
    """Row index of the C-order flattening of axes 0..len(perms)-1 permuted axis by axis."""
    index: Tensor | None = None
    for n, p in zip(shape, perms, strict=False):
        p = torch.arange(n, device=device) if p is None else p.to(device)
        index = p if index is None else (index.unsqueeze(1) * n + p.unsqueeze(0)).reshape(-1)
    assert index is not None
    return index


class Scratch:
    """One reusable buffer per thread for gather intermediates, grown to the largest size seen."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __reduce__(self):  # copies and pickles start empty (a thread-local cannot be copied)
        return (Scratch, ())

    def like(self, t: Tensor) -> Tensor:
        buf: Tensor | None = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype or buf.device != t.device:
            keep = buf.numel() if buf is not None and buf.dtype == t.dtype and buf.device == t.device else 0
            buf = torch.empty(max(t.numel(), keep), dtype=t.dtype, device=t.device)
            self._local.buf = buf
        return buf[:t.numel()].view(t.shape)


def permute_axes(t: Tensor, perms: list[Tensor | None], scratch: Scratch | None = None) -> Tensor:
    """``t`` with axis d re-indexed by ``perms[d]`` (None: unchanged); always a new tensor.

    `scratch` (optional) holds the intermediate of a two-pass gather, which then allocates only
    its result (fresh allocations of large tensors cost page faults on every step).
    """
    dims = [d for d, p in enumerate(perms) if p is not None]
    if not dims:
        return t.clone()
    t = t.contiguous()
    shape, last = t.shape, dims[-1]
    inner = math.prod(shape[last + 1:])
    if inner > 1 or last == 0:  # rows of `inner` contiguous elements, one gather
        rows = math.prod(shape[:last + 1])
        index = _merged_index(shape, perms[:last + 1], t.device)
        return t.reshape(rows, inner).index_select(0, index).reshape(shape)
    # the last axis itself is permuted: merged leading axes, then a 2-D column gather
    out = t.reshape(-1, shape[last])
    if len(dims) > 1:
        index = _merged_index(shape, perms[:last], t.device)
        out = torch.index_select(out, 0, index, out=scratch.like(out)) if scratch else out.index_select(0, index)
    return out.index_select(1, perms[last].to(t.device)).reshape(shape)


class Permute(Scheme):
    name = "permute"
    summary = "fresh secret permutations of rows, inner and output axes (MM-obfuscation)"
    updates_commute = True

    def __init__(self) -> None:
        self._scratch = Scratch()

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

    def with_fresh_rows(self, key: PermutationKey, shape: KeyShape, rng: RandomSource) -> PermutationKey:
        held = (Role.INNER, Role.OUT)
        for role in held:
            if key.perms[role].numel() != shape.sizes[role]:
                raise ValueError(f"held key covers {key.perms[role].numel()} {role.value} indices, "
                                 f"the op has {shape.sizes[role]}")
        perms = {role: key.perms[role] if role in held else rng.permutation(n) for role, n in shape.sizes.items()}
        inverses = {role: key.inverse(role) for role in held}  # computed once per held key
        return PermutationKey(perms, key.inner_of_out, inverses)

    def blind(self, t: Tensor, layout: Layout, operand: Operand, key: PermutationKey) -> Tensor:
        if key.inner_of_out is not None and Role.INNER_OF_OUT in layout:
            for dim, role in enumerate(layout):
                t = self._apply(t, dim, role, key, inverse=False)
            return t
        return permute_axes(t, [self._perm(role, key, inverse=False) for role in layout], self._scratch)

    def key_tensors(self, key: PermutationKey) -> dict[str, Tensor]:
        named = {role.value: p for role, p in key.perms.items()}
        if key.inner_of_out is not None:
            named[Role.INNER_OF_OUT.value] = key.inner_of_out
        return named

    def unblind(self, t: Tensor, layout: Layout, operand: Operand, key: PermutationKey) -> Tensor:
        if key.inner_of_out is not None and Role.INNER_OF_OUT in layout:
            for dim in reversed(range(len(layout))):
                t = self._apply(t, dim, layout[dim], key, inverse=True)
            return t
        return permute_axes(t, [self._perm(role, key, inverse=True) for role in layout], self._scratch)

    @staticmethod
    def _perm(role: Role | None, key: PermutationKey, *, inverse: bool) -> Tensor | None:
        if role is None:
            return None
        if role is Role.INNER_OF_OUT:  # ungrouped: an ordinary inner permutation
            role = Role.INNER
        return key.inverse(role) if inverse else key.perms[role]

    @staticmethod
    def _apply(t: Tensor, dim: int, role: Role | None, key: PermutationKey, *, inverse: bool) -> Tensor:
        """One axis at a time; used for grouped weights, whose inner index depends on the output row."""
        if role is None:
            return t
        if role is Role.INNER_OF_OUT:
            index = key.inner_of_out.view(*key.inner_of_out.shape, *([1] * (t.dim() - 2)))
            index = index.expand_as(t).to(t.device)
            if inverse:
                return torch.empty_like(t).scatter_(dim, index, t)
            return t.gather(dim, index)
        perm = key.inverse(role) if inverse else key.perms[role]
        return t.index_select(dim, perm.to(t.device))
