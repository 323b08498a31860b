"""Bytes <-> messages, without pickle: a JSON header followed by raw tensor bytes.

Frame layout: ``u32 header_len | header JSON | tensor bytes``. The decoder accepts only the
message types in :mod:`tempo.wire.messages`, checks every field's type, allows a fixed set of
dtypes, and checks that shapes and byte counts agree before touching tensor data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import torch
from torch import Tensor

from ..errors import ProtocolError
from .messages import BackwardJob, Failure, ForwardJob, Install, Message, Result, Shutdown, Update

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_TYPES = {cls.__name__: cls for cls in (ForwardJob, BackwardJob, Install, Update, Result, Failure, Shutdown)}
_FIELD_TYPES = {"job_id": int, "handle": int, "kind": str, "params": dict, "keep_x": bool, "keep_w": bool,
                "need_dx": bool, "need_dw": bool, "message": str, "release": list, "weight": int,
                "optimizer": str, "entries": list}
_TENSOR_FIELDS = ("x", "w", "dy")
_OPTIONAL_TENSORS = {(ForwardJob, "w")}  # absent: the job uses a resident weight
_MAX_HEADER = 1 << 20
_MAX_DIMS = 8


def encode(msg: Message) -> bytes:
    header: dict = {"type": type(msg).__name__, "tensors": []}
    blobs: list[bytes] = []
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.name == "tensors":
            for name, t in value.items():
                blobs.append(_encode_tensor(header, name, t))
        elif isinstance(value, Tensor):
            blobs.append(_encode_tensor(header, f.name, value))
        elif f.name in _TENSOR_FIELDS:  # an optional tensor that is absent
            continue
        else:
            header[f.name] = list(value) if isinstance(value, tuple) else value
    head = json.dumps(header).encode()
    return b"".join([struct.pack("<I", len(head)), head, *blobs])


def _encode_tensor(header: dict, name: str, t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in _DTYPE_NAMES:
        raise ProtocolError(f"cannot send tensor '{name}' of dtype {t.dtype}")
    header["tensors"].append({"name": name, "dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)})
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def decode(frame: bytes | bytearray | memoryview, *, max_bytes: int) -> Message:
    """Parse one frame; any malformation raises ProtocolError naming what was wrong."""
    view = memoryview(frame)
    if len(view) > max_bytes:
        raise ProtocolError(f"message of {len(view)} bytes exceeds the limit of {max_bytes}")
    if len(view) < 4:
        raise ProtocolError(f"truncated message ({len(view)} bytes)")
    (head_len,) = struct.unpack("<I", view[:4])
    if head_len > min(_MAX_HEADER, len(view) - 4):
        raise ProtocolError(f"header length {head_len} is out of range")
    try:
        header = json.loads(bytes(view[4:4 + head_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or header.get("type") not in _TYPES:
        raise ProtocolError(f"unknown message type {header.get('type') if isinstance(header, dict) else header!r}")
    cls = _TYPES[header["type"]]
    tensors = _decode_tensors(header.get("tensors"), view[4 + head_len:])
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name == "tensors":
            kwargs["tensors"] = tensors
        elif f.name in _TENSOR_FIELDS:
            if f.name not in tensors and (cls, f.name) not in _OPTIONAL_TENSORS:
                raise ProtocolError(f"{cls.__name__} lacks tensor '{f.name}'")
            kwargs[f.name] = tensors.get(f.name)
        elif f.name in header:
            kwargs[f.name] = _check_field(cls.__name__, f.name, header[f.name])
        elif f.default is dataclasses.MISSING:
            raise ProtocolError(f"{cls.__name__} lacks field '{f.name}'")
    return cls(**kwargs)


def _check_field(type_name: str, name: str, value):
    expected = _FIELD_TYPES[name]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ProtocolError(f"{type_name}.{name} must be {expected.__name__}, got {type(value).__name__}")
    if name == "release":
        if not all(isinstance(h, int) and not isinstance(h, bool) for h in value):
            raise ProtocolError(f"{type_name}.release must hold integers")
        return tuple(value)
    return value


def _decode_tensors(specs, body: memoryview) -> dict[str, Tensor]:
    if not isinstance(specs, list):
        raise ProtocolError("'tensors' must be a list")
    out: dict[str, Tensor] = {}
    offset = 0
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError(f"bad tensor spec {spec!r}")
        name, dtype, shape = spec["name"], _DTYPES.get(spec.get("dtype")), spec.get("shape")
        if dtype is None:
            raise ProtocolError(f"tensor '{name}' has unsupported dtype {spec.get('dtype')!r}")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise ProtocolError(f"tensor '{name}' has bad shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > len(body):
            raise ProtocolError(f"tensor '{name}' {shape} needs {nbytes} bytes, only {len(body) - offset} left")
        raw = bytearray(body[offset:offset + nbytes])
        offset += nbytes
        out[name] = (torch.frombuffer(raw, dtype=dtype).reshape(shape) if nbytes
                     else torch.empty(shape, dtype=dtype))
    if offset != len(body):
        raise ProtocolError(f"{len(body) - offset} trailing bytes after the tensors")
    return out
