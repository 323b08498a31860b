"""Property-based fuzzing of the wire codec: whatever a peer sends, decode gives a valid message or a
ProtocolError, nothing else, and allocates no tensor beyond what the frame itself holds."""

from __future__ import annotations

import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tempo.errors import ProtocolError
from tempo.wire import decode, encode
from tempo.wire.codec import _TYPES
from tempo.wire.messages import message_tensors

LIMIT = 1 << 20
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_ints = st.one_of(st.integers(-3, 70), st.integers(-(2**70), 2**70), st.sampled_from([2**31, 2**62, 2**63, -(2**63)]))
_json = st.recursive(
    st.none() | st.booleans() | _ints | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
_specs = st.fixed_dictionaries({
    "name": st.sampled_from(["x", "w", "dy", "y", "dx", "dw", "state/1/exp_avg"]) | st.text(max_size=6) | _json,
    "dtype": st.sampled_from(["float32", "float64", "float16", "bfloat16", "int64", "object"]) | _json,
    "shape": st.lists(st.integers(0, 6) | _ints, max_size=10) | _json,
})
_fields = st.dictionaries(
    st.sampled_from(["job_id", "handle", "kind", "params", "keep_x", "keep_w", "need_dx", "need_dw", "message",
                     "release", "weight", "optimizer", "entries", "bogus"]), _json, max_size=10)


def _check(frame: bytes | bytearray) -> None:
    """The property: a valid message that survives a round trip, or a ProtocolError; bounded tensors."""
    try:
        msg = decode(frame, max_bytes=LIMIT)
    except ProtocolError:
        return
    tensors = message_tensors(msg)
    assert sum(t.numel() * t.element_size() for _, t in tensors) <= len(frame)
    assert all(t.is_contiguous() for _, t in tensors)  # strides that exist, not overflowed ones
    again = decode(encode(msg), max_bytes=LIMIT)
    assert type(again) is type(msg)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data):
    _check(data)


@FUZZ
@given(st.binary(max_size=256), st.binary(max_size=256))
def test_arbitrary_bytes_behind_a_plausible_header_length(head, body):
    _check(struct.pack("<I", len(head)) + head + body)


@FUZZ
@given(st.sampled_from(sorted(_TYPES)) | _json, _fields, st.lists(_specs, max_size=4) | _json,
       st.integers(0, 4096), st.data())
def test_structured_hostile_headers(kind, fields, specs, body_len, data):
    header = {"type": kind, **fields, "tensors": specs}
    head = json.dumps(header).encode()
    if data.draw(st.booleans()):  # sometimes a body that fits the specs exactly
        try:
            body_len = sum(torch.Size(s["shape"]).numel() * 4 for s in specs)
        except (TypeError, ValueError, KeyError, RuntimeError, OverflowError):
            pass
    _check(struct.pack("<I", len(head)) + head + bytes(min(body_len, 1 << 16)))


@FUZZ
@given(st.integers(1, 40), st.sampled_from([b"[", b"{\"a\":", b"[{\"b\": "]))
def test_deep_nesting(depth, opener):
    head = b'{"type": "Result", "job_id": 1, "tensors": [], "x": ' + opener * depth * 1000
    _check(struct.pack("<I", len(head)) + head)
