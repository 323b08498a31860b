"""Intercept the torch functions that compute products, wherever a model calls them.

Handlers are keyed on torch *functions* (``F.linear``, ``F.conv2d``, ``torch.matmul``,
``F.scaled_dot_product_attention`` ...), not module types, so functional products inside timm or
``nn.MultiheadAttention`` are caught too. A product-heavy function with no handler runs inside
the enclave, with a one-line warning naming the module that called it: never sent in plaintext.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from .engine import Engine

Handler = Callable[..., Any]  # handler(engine, *args, **kwargs)
HANDLERS: dict[Callable, Handler] = {}

# Functions with a heavy product that Tempo does not offload: they run in the enclave, warned.
IN_ENCLAVE = {
    F.conv1d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.bilinear,
    torch.einsum, torch.tensordot, torch.addbmm, torch.addmv, torch.mv, torch.Tensor.mv, torch.chain_matmul,
    torch.linalg.multi_dot, torch.linalg.matmul, torch.inner, torch.outer,
    torch._native_multi_head_attention, torch._transformer_encoder_layer_fwd,
}
# Python-level composites whose internals must be intercepted one by one.
COMPOSITES = {F.multi_head_attention_forward}


def handles(*funcs: Callable) -> Callable[[Handler], Handler]:
    """Register a handler for one or more torch functions."""

    def register(handler: Handler) -> Handler:
        for f in funcs:
            HANDLERS[f] = handler
        return handler

    return register


_undispatched: dict[Callable, Callable] = {}


def _without_dispatch(func: Callable) -> Callable:
    """A copy of a Python composite that skips its own __torch_function__ dispatch.

    Inside a mode's handler the mode is off, so calling the composite would run its internal
    products unintercepted. This copy runs with the mode on but does not re-dispatch itself.
    """
    if func not in _undispatched:
        env = dict(func.__globals__, has_torch_function=lambda *_: False)
        _undispatched[func] = types.FunctionType(func.__code__, env, func.__name__, func.__defaults__,
                                                 func.__closure__)
        _undispatched[func].__kwdefaults__ = func.__kwdefaults__
    return _undispatched[func]


class OffloadMode(TorchFunctionMode):
    """Active while a protected model runs: routes every product to the engine."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is not None:
            return handler(self.engine, *args, **kwargs)
        if func in COMPOSITES:
            with self:
                return _without_dispatch(func)(*args, **kwargs)
        if func in IN_ENCLAVE:
            self.engine.note_in_enclave(func)
        return func(*args, **kwargs)


def warn_once(seen: set, key: Any, message: str) -> None:
    if key not in seen:
        seen.add(key)
        warnings.warn(message, stacklevel=3)
