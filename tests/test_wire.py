"""The wire codec: round trips, and hostile frames rejected with a clear ProtocolError."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from tempo.errors import ProtocolError
from tempo.wire import BackwardJob, Failure, ForwardJob, Install, Result, Shutdown, Update, decode, encode

LIMIT = 1 << 24


def test_round_trip_every_message():
    x, w = torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64)
    msgs = [
        ForwardJob(1, 2, "conv2d", {"stride": [1, 2], "groups": 1}, x, w, True, False, (7, 8)),
        ForwardJob(9, 2, "linear", {}, x, None, True, True, weight=4),
        BackwardJob(3, 2, torch.randn(3, 5), True, True),
        Install(10, 4, w),
        Update(11, "AdamW", [{"weight": 4, "scale": 0.5, "hyper": {"lr": 0.1, "betas": [0.9, 0.99]},
                               "state": {"step": 3.0}}], {"state/4/exp_avg": torch.randn(5, 4)}),
        Result(4, {"dx": torch.randn(2, 2), "dw": torch.empty(0, 3)}),
        Failure(5, "boom"), Shutdown(),
    ]
    for msg in msgs:
        back = decode(encode(msg), max_bytes=LIMIT)
        assert type(back) is type(msg)
        for name, value in vars(msg).items():
            other = getattr(back, name)
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other) and value.dtype == other.dtype
            elif isinstance(value, dict) and name == "tensors":
                assert value.keys() == other.keys() and all(torch.equal(value[k], other[k]) for k in value)
            else:
                assert value == other


def _frame(header: dict, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + body


@pytest.mark.parametrize(("frame", "complaint"), [
    (b"\x01", "truncated"),
    (struct.pack("<I", 999) + b"{}", "header length"),
    (_frame({"type": "os.system"}), "unknown message type"),
    (struct.pack("<I", 5) + b"{nope", "not valid JSON"),
    (_frame({"type": "Failure", "job_id": "1", "message": "x", "tensors": []}), "must be int"),
    (_frame({"type": "Failure", "job_id": True, "message": "x", "tensors": []}), "must be int"),
    (_frame({"type": "Result", "job_id": 1, "tensors": [{"name": "y", "dtype": "int64", "shape": [1]}]},
            b"\0" * 8), "unsupported dtype"),
    (_frame({"type": "Result", "job_id": 1, "tensors": [{"name": "y", "dtype": "float32", "shape": [-1]}]}),
     "bad shape"),
    (_frame({"type": "Result", "job_id": 1, "tensors": [{"name": "y", "dtype": "float32", "shape": [1000]}]}),
     "needs 4000 bytes"),
    (_frame({"type": "Result", "job_id": 1, "tensors": [{"name": "y", "dtype": "float32", "shape": [10**9]}]}),
     "larger than the message limit"),
    (_frame({"type": "Result", "job_id": 1, "tensors": []}, b"xx"), "trailing"),
    (_frame({"type": "BackwardJob", "job_id": 1, "handle": 1, "need_dx": True, "need_dw": True, "tensors": []}),
     "lacks tensor 'dy'"),
    (_frame({"type": "ForwardJob", "job_id": 1, "tensors": []}), "lacks"),
    (_frame({"type": "Install", "job_id": 1, "weight": 2, "tensors": []}), "lacks tensor 'w'"),
    (_frame({"type": "Update", "job_id": 1, "optimizer": "SGD", "entries": {}, "tensors": []}), "must be list"),
])
def test_malformed_frames_are_rejected(frame, complaint):
    with pytest.raises(ProtocolError, match=complaint):
        decode(frame, max_bytes=LIMIT)


def test_oversized_frame_is_rejected():
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode(b"\0" * 100, max_bytes=50)


def _raw(head: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<I", len(head)) + head + body


def _result(spec: dict) -> bytes:
    return _frame({"type": "Result", "job_id": 1, "tensors": [spec]})


# Issue 16, finding 3: frames from a malicious worker that used to escape as TypeError, RecursionError,
# ValueError or a torch error (and end the run) instead of the ProtocolError that retires the worker.
@pytest.mark.parametrize(("frame", "complaint"), [
    (_frame({"type": []}), "unknown message type"),
    (_frame({"type": {"a": 1}}), "unknown message type"),
    (_result({"name": "y", "dtype": [], "shape": [1]}), "unsupported dtype"),
    (_result({"name": "y", "dtype": {}, "shape": [1]}), "unsupported dtype"),
    (_raw(b'{"type": "Result", "job_id": 1, "tensors": [], "pad": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     "nested deeper"),
    (_raw(b'{"type": "Failure", "job_id": ' + b"9" * 5000 + b', "message": "x", "tensors": []}'), "fit 64 bits"),
    (_result({"name": "y", "dtype": "float32", "shape": [0, 2**63]}), "fit 64 bits"),
    (_result({"name": "y", "dtype": "float32", "shape": [0, 2**62]}), "larger than the message limit"),
    (_result({"name": "y", "dtype": "float32", "shape": [0, 2**62, 2**62]}), "larger than the message limit"),
    (_result({"name": "y", "dtype": "float32", "shape": [2**40, 0, 2**40]}), "larger than the message limit"),
    (_raw(b'{"type": "Failure", "job_id": 1, "message": NaN, "tensors": []}'), "not a number"),
    (_raw(b'{"type": "Failure", "job_id": 1, "message": 1e999, "tensors": []}'), "out of range"),
    (_raw(b'{"type": "Failure", "type": "Result", "job_id": 1, "tensors": []}'), "repeats a key"),
    (_raw(b"[1, 2]"), "not an object"),
    (_frame({"type": "Failure", "job_id": 1, "message": "x", "tensors": [], "extra": 1}), "unknown field"),
    (_frame({"type": "Result", "job_id": 1, "tensors": [{"name": "y", "dtype": "float32", "shape": [1]}] * 2},
            b"\0" * 8), "repeated"),
    (_frame({"type": "Install", "job_id": 1, "weight": 2, "tensors": [
        {"name": "w", "dtype": "float32", "shape": [1]}, {"name": "z", "dtype": "float32", "shape": [1]}]},
        b"\0" * 8), "not part of the message"),
    (_result({"name": "y", "dtype": "float32", "shape": [1], "stride": [1]}), "bad tensor spec"),
    (_raw(b'{"type": "Failure", "job_id": 1, "message": "\xff", "tensors": []}'), "not valid JSON"),
], ids=["type-list", "type-dict", "dtype-list", "dtype-dict", "nested-100k", "int-5000-digits", "dim-2**63",
        "empty-dim-2**62", "empty-stride-overflow", "empty-middle", "nan", "inf", "duplicate-key", "not-object",
        "unknown-field", "duplicate-tensor", "extra-tensor", "extra-spec-key", "not-utf8"])
def test_hostile_frames_are_protocol_errors(frame, complaint):
    with pytest.raises(ProtocolError, match=complaint):
        decode(frame, max_bytes=LIMIT)


def test_what_the_checks_did_not_foresee_is_still_a_protocol_error_naming_it(monkeypatch):
    """The decode boundary turns an unexpected exception into a ProtocolError that names it."""
    import tempo.wire.codec as codec

    def broken(*_):
        raise KeyError("unforeseen")

    monkeypatch.setattr(codec, "_check_field", broken)
    with pytest.raises(ProtocolError, match="undecodable message \\(KeyError: 'unforeseen'\\)"):
        decode(encode(Failure(1, "boom")), max_bytes=LIMIT)


def test_peer_text_in_errors_is_escaped():
    with pytest.raises(ProtocolError) as caught:
        decode(_frame({"type": "\x1b[2J\x1b]0;owned\x07" + "x" * 10_000}), max_bytes=LIMIT)
    assert "\x1b" not in str(caught.value) and "\x07" not in str(caught.value) and len(str(caught.value)) < 200


def test_a_reply_header_has_its_own_small_bound():
    big = encode(Failure(1, "x" * 20_000))
    assert isinstance(decode(big, max_bytes=LIMIT), Failure)
    with pytest.raises(ProtocolError, match="header length"):
        decode(big, max_bytes=LIMIT, max_header=16 << 10)


def test_tensors_are_views_of_a_writable_frame_not_copies():
    """At most one copy of the payload: the transport's buffer itself (aligned by the encoder's padding)."""
    frame = encode(Result(7, {"dx": torch.ones(4, 4), "dw": torch.ones(2, dtype=torch.float64)}))
    reply = decode(frame, max_bytes=LIMIT)
    frame[-16:] = struct.pack("<2d", 2.0, 3.0)  # dw's bytes, after the decode
    assert reply.tensors["dw"].tolist() == [2.0, 3.0] and torch.equal(reply.tensors["dx"], torch.ones(4, 4))
    frozen = decode(bytes(frame), max_bytes=LIMIT)  # read-only bytes: one copy per tensor
    assert frozen.tensors["dw"].tolist() == [2.0, 3.0]
