"""Process tuning for benchmarks and tests on small CPU machines."""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc only) so large tensors do not page-fault again.

    Same effect as ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
    MALLOC_TOP_PAD_=268435456``. Returns False where glibc's mallopt is unavailable.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
                    and libc.mallopt(_M_TOP_PAD, 256 << 20))
    except (OSError, AttributeError):
        return False


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None keeps the current value); return the value in force."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
