"""Op handlers, one file per family; importing this package registers them all."""

from . import attention, conv2d, linear, matmul

__all__ = ["attention", "conv2d", "linear", "matmul"]
