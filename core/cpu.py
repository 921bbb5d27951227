"""Host-memory allocator tuning for training on the CPU.

glibc's malloc serves large requests (>= 128 KiB-32 MiB) with fresh ``mmap`` pages and returns them
to the OS on free, so every training step page-faults its large activations and gradients in
again. On the machines rapid is tested on that costs ~2 us per 4 KiB page: 15 ms for one 32 MiB
tensor, 10-15% of an MoE layer's step. ``keep_freed_memory()`` makes malloc serve everything from
its heap and never trim it, so steady-state steps reuse memory that is already mapped (what
jemalloc/tcmalloc, recommended by PyTorch's CPU tuning guide, achieve by caching). The process keeps
its peak footprint until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # <malloc.h>
_applied = False


def keep_freed_memory() -> bool:
    """Apply the glibc settings once per process; False where the C library is not glibc."""
    global _applied
    if _applied:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
