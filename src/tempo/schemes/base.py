"""The interface every blinding scheme implements.

A scheme turns a product's :class:`~tempo.products.KeyShape` into a fresh secret key and
applies it to operands axis by axis, using only the role of each axis
(:class:`~tempo.products.Role`). The protocol never branches on the scheme. Randomness is passed
in, so tests can seed it and attacks can reason about it.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from torch import Tensor

from ..products import KeyShape, Layout


class RandomSource(Protocol):
    """Cryptographically strong randomness (see tempo.enclave.keys.KeyStream)."""

    def permutation(self, n: int) -> Tensor: ...

    def signs(self, shape: Sequence[int]) -> Tensor: ...

    def uniform(self, shape: Sequence[int]) -> Tensor: ...

    def normal(self, shape: Sequence[int]) -> Tensor: ...


class Operand(str, enum.Enum):
    """Which tensor of the product is being (un)blinded; schemes with non-orthogonal keys need it."""

    X = "x"
    W = "w"
    DY = "dy"
    Y = "y"
    DX = "dx"
    DW = "dw"


class Scheme(ABC):
    name: ClassVar[str]
    secure: ClassVar[bool] = True
    summary: ClassVar[str]
    # Whether an element-wise optimizer step on a blinded weight, with its blinded gradient, is the
    # blinded step (true for permutations): what a key lifetime K > 1 needs.
    updates_commute: ClassVar[bool] = False
    # Whether unblinding is exact (a permutation): then results are checked in plaintext space and
    # the enclave keeps no blinded copies. Otherwise unblinding adds rounding that the plaintext
    # check cannot tell from a lie, so the blinded result is checked before unblinding.
    exact: ClassVar[bool] = True

    @abstractmethod
    def new_key(self, shape: KeyShape, rng: RandomSource) -> Any:
        """A fresh key for one op invocation (its forward and its backward)."""

    @abstractmethod
    def with_fresh_rows(self, key: Any, shape: KeyShape, rng: RandomSource) -> Any:
        """A key for one invocation that keeps `key`'s weight axes (inner, out) and draws every other axis
        afresh: how a weight held for K steps (key lifetime) meets new inputs."""

    @abstractmethod
    def blind(self, t: Tensor, layout: Layout, operand: Operand, key: Any) -> Tensor:
        """The blinded copy of t that may leave the enclave. Must not alias t's storage."""

    @abstractmethod
    def key_tensors(self, key: Any) -> dict[str, Tensor]:
        """The key as named tensors, for the leakage suite's ground truth (never sent anywhere)."""

    @abstractmethod
    def unblind(self, t: Tensor, layout: Layout, operand: Operand, key: Any) -> Tensor:
        """Map a worker's result back to plaintext space."""
