"""Key material from a cryptographically secure generator.

An AES-256-CTR keystream (``cryptography``) keyed from ``os.urandom``. torch's and numpy's
default generators are not used for keys: their state can be rebuilt from enough outputs.
A seeded stream exists for reproducible experiments and tests only; it warns.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import Tensor


class KeyStream:
    """Secret permutations and random signs for blinding keys and Freivalds vectors."""

    def __init__(self, seed: int | None = None):
        if seed is None:
            key = os.urandom(32)
        else:
            warnings.warn(
                f"KeyStream seeded with {seed}: keys are predictable to anyone who knows the seed. "
                "Use this only for tests and reproducible experiments.", stacklevel=2)
            key = hashlib.sha256(b"tempo-keystream:" + str(seed).encode()).digest()
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._enc.update(b"\0" * n)

    def permutation(self, n: int) -> Tensor:
        """A uniformly random permutation of range(n) (sort of 64-bit random keys)."""
        if n <= 1:
            return torch.zeros(n, dtype=torch.long)
        keys = np.frombuffer(self.bytes(8 * n), dtype=np.uint64)
        return torch.from_numpy(np.argsort(keys, kind="stable").astype(np.int64))

    def uniform(self, shape: Sequence[int]) -> Tensor:
        """Independent uniform [0, 1) entries (float64, 53 random bits each)."""
        n = int(np.prod(shape))
        bits = np.frombuffer(self.bytes(8 * n), dtype=np.uint64) >> np.uint64(11)
        return torch.from_numpy(bits.astype(np.float64) * 2.0**-53).reshape(tuple(shape))

    def normal(self, shape: Sequence[int]) -> Tensor:
        """Independent standard normal entries (float64; Box-Muller on two uniform streams)."""
        u1, u2 = 1.0 - self.uniform(shape), self.uniform(shape)  # u1 in (0, 1]: log is finite
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)

    def signs(self, shape: Sequence[int]) -> Tensor:
        """Independent uniform ±1 entries (float32)."""
        n = int(np.prod(shape))
        bits = np.unpackbits(np.frombuffer(self.bytes((n + 7) // 8), dtype=np.uint8))[:n]
        return torch.from_numpy(bits.astype(np.float32) * 2 - 1).reshape(tuple(shape))
