"""Anchors: the first and the last product of a forward stay in the enclave unless the user offloads them.

The first product sees the raw inputs, and the last one's output gradient is the softmax minus
the one-hot labels: they are the hardest operands for any scheme to hide, and a small share of
the work. Which products they are is learned from the model's first forward, which runs wholly in
the enclave (its results are the plaintext ones): the modules of its first and its last product
are the anchors from then on, every call of them included.
"""

from __future__ import annotations

import warnings


class Anchors:
    """Which ops run in the enclave because they anchor the model to its inputs and labels."""

    def __init__(self, offload: bool):
        self.offload = offload
        self.names: tuple[str, str] | None = None  # (first, last); None until the first forward ends
        self._seen: list[str] = []

    def keeps(self, op: str) -> bool:
        """Whether op `op` runs in the enclave (during the first forward: every op, to learn the order)."""
        if self.offload:
            return False
        if self.names is None:
            self._seen.append(op)
            return True
        return op in self.names

    def end_forward(self, completed: bool) -> None:
        """A forward returned (or failed: then learn again from the next one)."""
        if self.names is None and self._seen and completed:
            self.names = (self._seen[0], self._seen[-1])
            warnings.warn(f"tempo: the first and last products ('{self.names[0]}', '{self.names[1]}') run "
                          "inside the enclave: they see the raw inputs and the labels "
                          "(protect(..., offload_anchors=True) offloads them)", stacklevel=3)
        self._seen = []
