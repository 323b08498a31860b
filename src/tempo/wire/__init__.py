"""The wire protocol: the only package both sides of the trust boundary import."""

from .codec import decode, encode
from .messages import (
    PROTOCOL_VERSION,
    UPDATABLE_OPTIMIZERS,
    BackwardJob,
    Failure,
    ForwardJob,
    Install,
    Message,
    Result,
    Shutdown,
    Update,
)
from .transport import TrafficStats

__all__ = [
    "PROTOCOL_VERSION",
    "UPDATABLE_OPTIMIZERS",
    "BackwardJob",
    "Failure",
    "ForwardJob",
    "Install",
    "Message",
    "Result",
    "Shutdown",
    "TrafficStats",
    "Update",
    "decode",
    "encode",
]
