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
    (_frame({"type": "Result", "job_id": 1, "tensors": [{"name": "y", "dtype": "float32", "shape": [10**9]}]}),
     "needs"),
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
