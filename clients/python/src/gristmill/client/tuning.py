"""Process-level tuning for moving large byte buffers.

glibc returns big buffers to the kernel after every free by default, so every
new 1-4 MiB message touches fresh pages (2-3 us per 4 KiB page here). Raising
the mmap/trim thresholds keeps that memory in the heap for reuse; measured on
this project's machines it speeds up every gRPC configuration by 30-40%.
Equivalent to MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
MALLOC_TOP_PAD_=67108864 in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 4 << 30,
                top_pad: int = 64 << 20) -> bool:
    """Apply the glibc settings above to this process; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1
    ok &= mallopt(_M_TOP_PAD, top_pad) == 1
    return bool(ok)
