"""One error hierarchy for both sides of the trust boundary.

Every message says what failed, with the offending values, and what to do about it.
This module imports nothing from Tempo, so the worker side can use it.
"""

from __future__ import annotations


class TempoError(Exception):
    """Base class of every error Tempo raises on purpose."""


class ConfigError(TempoError):
    """A setting, name or path given by the user is wrong."""


class DatasetError(TempoError):
    """A dataset is missing, unreadable or corrupt."""


class UnsupportedModelError(TempoError):
    """The model holds layers that Tempo can neither offload nor run in the enclave."""

    def __init__(self, offenders: list[str]):
        self.offenders = offenders
        lines = "\n".join(f"  - {o}" for o in offenders)
        super().__init__(
            f"{len(offenders)} layer(s) cannot be protected:\n{lines}\n"
            "Replace them with supported layers (nn.Linear, nn.Conv2d, attention built on "
            "matmul / scaled_dot_product_attention) or run the model in --mode enclave."
        )


class ProtocolError(TempoError):
    """A message on the wire is malformed, oversized, or does not answer the job it claims to."""


class WorkerError(TempoError):
    """A worker failed to deliver a result: it died, stalled, or reported an error."""


class WorkerLostError(WorkerError):
    """A worker process exited or its connection closed."""


class WorkerTimeoutError(WorkerError):
    """A worker did not answer within the timeout."""


class WorkerSlowError(WorkerError):
    """A worker answers far slower than its peers do the same jobs (tempo.enclave.pace): its replies are
    correct, but it holds up the run."""


class IntegrityError(TempoError):
    """A worker's result failed verification; the result was discarded."""

    def __init__(self, *, op: str, product: str, step: int, worker: str, detail: str):
        self.op, self.product, self.step, self.worker = op, product, step, worker
        super().__init__(
            f"integrity check failed: op '{op}' ({product}) at step {step} from worker {worker}: "
            f"{detail}. The result was discarded; do not trust this worker."
        )


class SealError(TempoError):
    """A sealed file (bundle, checkpoint, model) is corrupt, truncated, altered, or under another key."""


class AttestationError(TempoError):
    """Key release refused: evidence that does not verify, an unexpected measurement, a replayed
    handshake, or a key server that answered out of protocol."""
