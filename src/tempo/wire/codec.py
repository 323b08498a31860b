"""Bytes <-> messages, without pickle: a JSON header followed by raw tensor bytes.

Frame layout: ``u32 header_len | header JSON | tensor bytes``. The header is padded with spaces
so that the tensor bytes start 8-aligned: a decoder can then hand out tensors that are views of
the received buffer instead of copies.

Every frame is hostile until parsed: the decoder accepts only the message types in
:mod:`tempo.wire.messages` and their fields, integers that fit int64, headers nested at most
:data:`MAX_NESTING` deep, a fixed set of dtypes, and shapes whose element and byte counts are
checked (without overflow) against the frame before any tensor exists. Anything it did not
foresee still ends as a :class:`ProtocolError` naming it, never as another exception: a peer's
bytes can get a worker retired, not crash the enclave.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct

import torch
from torch import Tensor

from ..errors import ProtocolError
from .messages import BackwardJob, Failure, ForwardJob, Install, Message, Result, Shutdown, Update
from .text import printable

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_TYPES = {cls.__name__: cls for cls in (ForwardJob, BackwardJob, Install, Update, Result, Failure, Shutdown)}
_FIELD_TYPES = {"job_id": int, "handle": int, "kind": str, "params": dict, "keep_x": bool, "keep_w": bool,
                "need_dx": bool, "need_dw": bool, "message": str, "release": list, "weight": int,
                "optimizer": str, "entries": list}
_TENSOR_FIELDS = ("x", "w", "dy")
_OPTIONAL_TENSORS = {(ForwardJob, "w")}  # absent: the job uses a resident weight
_SPEC_KEYS = {"name", "dtype", "shape"}
MAX_HEADER_BYTES = 1 << 20  # any message's header (an Update's entries are the largest)
REPLY_HEADER_BYTES = 16 << 10  # a reply's header: job id and tensor specs, or a Failure's message
MAX_NESTING = 16  # JSON depth: the deepest real header (Update entries' hyperparameters) is 5
_MAX_DIMS = 8
_ALIGN = 8
_INT64 = (-(1 << 63), (1 << 63) - 1)
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# What a decoding step can raise on input it did not foresee (a bug, then): turned into ProtocolError at the
# boundary. MemoryError is not among them: the checks bound every allocation by the frame's size.
_UNFORESEEN = (ArithmeticError, LookupError, RuntimeError, TypeError, ValueError, struct.error)


def reply_frame_bytes(payload_bytes: int) -> int:
    """The largest frame a reply carrying `payload_bytes` of tensors may be: length field, header, tensors."""
    return 4 + REPLY_HEADER_BYTES + payload_bytes


def encode(msg: Message) -> bytearray:
    """One frame; each tensor's bytes are copied once, straight into it."""
    header: dict = {"type": type(msg).__name__, "tensors": []}
    tensors: list[Tensor] = []
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.name == "tensors":
            for name, t in value.items():
                tensors.append(_tensor_spec(header, name, t))
        elif isinstance(value, Tensor):
            tensors.append(_tensor_spec(header, f.name, value))
        elif f.name in _TENSOR_FIELDS:  # an optional tensor that is absent
            continue
        else:
            header[f.name] = list(value) if isinstance(value, tuple) else value
    head = json.dumps(header).encode()
    head += b" " * (-(4 + len(head)) % _ALIGN)
    frame = bytearray(4 + len(head) + sum(t.numel() * t.element_size() for t in tensors))
    frame[:4], frame[4:4 + len(head)] = struct.pack("<I", len(head)), head
    offset = 4 + len(head)
    for t in tensors:
        n = t.numel() * t.element_size()
        if n:
            torch.frombuffer(frame, dtype=torch.uint8, count=n, offset=offset).copy_(t.reshape(-1).view(torch.uint8))
        offset += n
    return frame


def _tensor_spec(header: dict, name: str, t: Tensor) -> Tensor:
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in _DTYPE_NAMES:
        raise ProtocolError(f"cannot send tensor '{name}' of dtype {t.dtype}")
    header["tensors"].append({"name": name, "dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)})
    return t


def decode(frame: bytes | bytearray | memoryview, *, max_bytes: int, max_header: int = MAX_HEADER_BYTES
           ) -> Message:
    """Parse one frame; any malformation raises ProtocolError naming what was wrong.

    Tensors are views of `frame` where it is writable and they are aligned (no copy), else one copy each.
    `max_header` bounds the JSON header (a reply's is small: :data:`REPLY_HEADER_BYTES`).
    """
    try:
        return _decode(memoryview(frame).cast("B"), max_bytes, max_header)
    except ProtocolError:
        raise
    except _UNFORESEEN as e:
        raise ProtocolError(f"undecodable message ({type(e).__name__}: {printable(str(e))})") from None


def _decode(view: memoryview, max_bytes: int, max_header: int) -> Message:
    if len(view) > max_bytes:
        raise ProtocolError(f"message of {len(view)} bytes exceeds the limit of {max_bytes}")
    if len(view) < 4:
        raise ProtocolError(f"truncated message ({len(view)} bytes)")
    (head_len,) = struct.unpack("<I", view[:4])
    if head_len > min(max_header, len(view) - 4):
        raise ProtocolError(f"header length {head_len} is out of range (at most {min(max_header, len(view) - 4)})")
    header = _parse_header(bytes(view[4:4 + head_len]))
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in _TYPES:
        raise ProtocolError(f"unknown message type {_shown(kind)}")
    cls = _TYPES[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(header) - {"type", "tensors"} - (set(fields) - set(_TENSOR_FIELDS) - {"tensors"})
    if unknown:
        raise ProtocolError(f"{kind} has unknown field(s) {_shown(sorted(unknown))}")
    allowed = None if "tensors" in fields else {name for name in _TENSOR_FIELDS if name in fields}
    tensors = _decode_tensors(header.get("tensors"), view, 4 + head_len, max_bytes, allowed)
    kwargs = {}
    for f in fields.values():
        if f.name == "tensors":
            kwargs["tensors"] = tensors
        elif f.name in _TENSOR_FIELDS:
            if f.name not in tensors and (cls, f.name) not in _OPTIONAL_TENSORS:
                raise ProtocolError(f"{kind} lacks tensor '{f.name}'")
            kwargs[f.name] = tensors.get(f.name)
        elif f.name in header:
            kwargs[f.name] = _check_field(kind, f.name, header[f.name])
        elif f.default is dataclasses.MISSING:
            raise ProtocolError(f"{kind} lacks field '{f.name}'")
    return cls(**kwargs)


def _parse_header(head: bytes) -> dict:
    """The header as a JSON object: nesting, integers, constants and keys checked while parsing."""
    depth = deepest = 0
    for bracket in _STRINGS.sub(b'""', head).translate(None, _NOT_BRACKETS):
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            raise ProtocolError(f"header nested deeper than {MAX_NESTING} levels")
    try:
        header = _JSON.decode(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"header is not valid JSON: {printable(str(e))}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header is a JSON {type(header).__name__}, not an object")
    return header


def _json_int(text: str) -> int:
    if len(text) > 20 or not _INT64[0] <= (value := int(text)) <= _INT64[1]:
        raise ProtocolError(f"integer {printable(text, 30)} does not fit 64 bits")
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"number {printable(text, 30)} is out of range")
    return value


def _json_constant(text: str) -> float:
    raise ProtocolError(f"{text} is not a number the protocol accepts")


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ProtocolError("a header object repeats a key")
    return out


_JSON = json.JSONDecoder(parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant,
                         object_pairs_hook=_json_object)


def _shown(value: object) -> str:
    """A peer's value in an error message: escaped and cut short."""
    return printable(repr(value), 80)


def _check_field(type_name: str, name: str, value):
    expected = _FIELD_TYPES[name]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ProtocolError(f"{type_name}.{name} must be {expected.__name__}, got {type(value).__name__}")
    if name == "release":
        if not all(isinstance(h, int) and not isinstance(h, bool) for h in value):
            raise ProtocolError(f"{type_name}.release must hold integers")
        return tuple(value)
    return value


def _decode_tensors(specs, frame: memoryview, start: int, max_bytes: int, allowed: set[str] | None
                    ) -> dict[str, Tensor]:
    """The tensors the specs announce, laid out back to back from `start`, which they must fill exactly."""
    if not isinstance(specs, list):
        raise ProtocolError("'tensors' must be a list")
    out: dict[str, Tensor] = {}
    offset = start
    for spec in specs:
        name, dtype, shape = _check_spec(spec, max_bytes)
        if name in out or (allowed is not None and name not in allowed):
            raise ProtocolError(f"tensor {_shown(name)} is {'repeated' if name in out else 'not part of the message'}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > len(frame) - offset:
            raise ProtocolError(f"tensor {_shown(name)} {shape} needs {nbytes} bytes, only {len(frame) - offset} left")
        out[name] = _tensor(frame, offset, nbytes, dtype, shape)
        offset += nbytes
    if offset != len(frame):
        raise ProtocolError(f"{len(frame) - offset} trailing bytes after the tensors")
    return out


def _check_spec(spec, max_bytes: int) -> tuple[str, torch.dtype, list[int]]:
    """A tensor spec's name, dtype and shape, its strides known to fit `max_bytes` (torch's strides treat a
    zero-sized dimension as one: an empty tensor of shape [0, 2**62, 2**62] would overflow them)."""
    if not isinstance(spec, dict) or set(spec) != _SPEC_KEYS or not isinstance(spec["name"], str):
        raise ProtocolError(f"bad tensor spec {_shown(spec)}")
    name, dtype_name, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise ProtocolError(f"tensor {_shown(name)} has unsupported dtype {_shown(dtype_name)}")
    dtype = _DTYPES[dtype_name]
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ProtocolError(f"tensor {_shown(name)} has bad shape {_shown(shape)}")
    span = dtype.itemsize
    for s in shape:
        span *= max(s, 1)
        if span > max_bytes:
            raise ProtocolError(f"tensor {_shown(name)} has shape {_shown(shape)}, larger than the message limit")
    return name, dtype, shape


def _tensor(frame: memoryview, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> Tensor:
    """A view of the frame's bytes when it is writable and aligned for `dtype`, else a copy."""
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    if frame.readonly or offset % dtype.itemsize:
        return torch.frombuffer(bytearray(frame[offset:offset + nbytes]), dtype=dtype).reshape(shape)
    return torch.frombuffer(frame, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
