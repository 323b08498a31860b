"""Bilinear product kinds: kernels and integrity sketches, shared by enclave and worker."""

from __future__ import annotations

from .base import KeyShape, Layout, Layouts, OpShapes, Product, ProductKind, Role, sum_of_squares
from .conv2d import Conv2d
from .matmul import BatchedMatmul, Linear

KINDS: dict[str, type[ProductKind]] = {k.name: k for k in (Linear, BatchedMatmul, Conv2d)}


def make_kind(name: str, params: dict) -> ProductKind:
    """Build a product kind from its wire name and params; raises ValueError on anything unknown."""
    try:
        cls = KINDS[name]
    except KeyError:
        raise ValueError(f"unknown product kind {name!r}; known: {sorted(KINDS)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"bad params for {name}: {params} ({e})") from None


__all__ = [
    "KINDS", "BatchedMatmul", "Conv2d", "KeyShape", "Layout", "Layouts", "Linear", "OpShapes",
    "Product", "ProductKind", "Role", "make_kind", "sum_of_squares",
]
