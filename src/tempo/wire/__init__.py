"""The wire protocol: the only package both sides of the trust boundary import."""

from .codec import decode, encode
from .messages import PROTOCOL_VERSION, BackwardJob, Failure, ForwardJob, Message, Result, Shutdown
from .transport import SocketTransport, TrafficStats

__all__ = [
    "PROTOCOL_VERSION", "BackwardJob", "Failure", "ForwardJob", "Message", "Result", "Shutdown",
    "SocketTransport", "TrafficStats", "decode", "encode",
]
