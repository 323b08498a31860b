"""Blinding schemes: how operands are hidden from workers. Pick one by name."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Operand, RandomSource, Scheme
from .mix import Mix
from .none import NoBlinding
from .permute import Permute

SCHEMES: dict[str, type[Scheme]] = {s.name: s for s in (NoBlinding, Permute, Mix)}


def get_scheme(name: str | Scheme) -> Scheme:
    if isinstance(name, Scheme):
        return name
    try:
        return SCHEMES[name]()
    except KeyError:
        raise ConfigError(f"unknown scheme {name!r}; choose one of {sorted(SCHEMES)}") from None


__all__ = ["SCHEMES", "Mix", "NoBlinding", "Operand", "Permute", "RandomSource", "Scheme", "get_scheme"]
