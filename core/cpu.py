"""Host-memory allocator tuning for training on the CPU.

glibc's malloc serves large requests (>= 128 KiB-32 MiB) with fresh ``mmap`` pages and returns them
to the OS on free, so every training step page-faults its large activations and gradients in
again. On the machines rapid is tested on that costs ~2 us per 4 KiB page: 15 ms for one 32 MiB
tensor, 10-15% of an MoE layer's step. ``keep_freed_memory()`` makes malloc serve everything from
its heap and never trim it, so steady-state steps reuse memory that is already mapped (what
jemalloc/tcmalloc, recommended by PyTorch's CPU tuning guide, achieve by caching). Left alone, the
heap fragments as routing changes tensor sizes every step: the tiny recipe's resident memory grew
from 0.7 to 2.2 GiB over 550 steps. ``release_freed_memory()`` (``malloc_trim``), which the training
loop calls every ``TRIM_EVERY`` steps, returns the free pages when free chunks outgrow the memory in
use. Measured on that recipe (200 steps, A/B runs alternated): no trim 13.5k tokens/s and still
growing; every 50 steps 0.9-1.0 GiB, -2%; every 25 0.8 GiB, within noise; every 10 0.64 GiB, -4.5%;
every step 0.51 GiB, -27% (the page faults are back).

Why the heap fragments: torch allocates with ``posix_memalign(64)``, which (glibc 2.36, this
project's machines) asks malloc for 96 bytes more than the tensor and frees the spare end as a small
chunk into its per-thread cache (tcache), where it never merges with its neighbours. When the tensor
is freed its chunk cannot merge with the free space behind that sliver, and the next tensor of the
same size needs more than the hole holds: the heap grows by one tensor, as long as other small
allocations keep emptying the cache (measured: an MoE layer's 128 MiB expert gradients grew it by
2.4 GiB in 24 steps). ``TUNABLES`` switches the tcache off (small chunks then go to fastbins, which
malloc merges before every large request): the same layer's heap stops growing after two steps. It
makes the pattern rare, not impossible (a small allocation made while the tensor lives can still land
in the spare bytes). glibc reads tunables only at process start, so the ``rapid`` command
re-executes itself once with them (``reexec_tuned``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # <malloc.h>
TRIM_EVERY = 10                          # training steps between checks for fragmentation
TRIM_FREE_RATIO = 0.5                   # trim when free heap chunks exceed this times the memory in use
TUNABLES = "glibc.malloc.tcache_count=0"   # see above; RAPID_GLIBC_TUNABLES=0 leaves glibc as it is
_applied = False


def reexec_environment(environ) -> dict | None:
    """The environment to re-execute this process with so that glibc starts with ``TUNABLES``, or
    None: not glibc, the tunable already set (by the user too), or ``RAPID_GLIBC_TUNABLES`` set at
    all (``0`` opts out; the re-executed process has ``1``, so it never re-executes again, even
    where glibc ignores the variable, as for binaries with file capabilities)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if "RAPID_GLIBC_TUNABLES" in environ or platform.libc_ver()[0] != "glibc" or TUNABLES.split("=")[0] in current:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLES}" if current else TUNABLES,
            "RAPID_GLIBC_TUNABLES": "1"}


def reexec_tuned() -> None:
    """Re-execute this program once, its command line as it was started (``sys.orig_argv``:
    interpreter flags, ``-m``, a console script's path and the import path it implies), with glibc's
    ``TUNABLES``; returns when there is nothing to do or it cannot (no interpreter path, a frozen
    app, exec refused). Only for a program's entry point: it replaces the process."""
    import sys
    env = reexec_environment(os.environ)
    if env is None or not sys.executable or getattr(sys, "frozen", False) or len(sys.orig_argv) < 2:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return


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


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def release_freed_memory() -> bool:
    """After ``keep_freed_memory``: return the heap's free pages to the OS when free chunks outgrow
    the memory in use (fragmentation), keeping them otherwise. True if it trimmed."""
    if not _applied:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    try:
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
    except AttributeError:          # glibc < 2.33: trim on every call
        return bool(libc.malloc_trim(0)) or True
    if info.fordblks <= TRIM_FREE_RATIO * info.uordblks:
        return False
    libc.malloc_trim(0)
    return True
