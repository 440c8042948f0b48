"""Make glibc give freed tensor memory back to the system, so a long stage's resident memory follows
what it holds, not what it once held.

glibc serves a request under its mmap threshold from its heap and keeps the block when freed, and
the threshold rises (up to 32 MiB) each time a larger mmapped block is freed. The audit frees
thousands of batch-sized tensors of many sizes (pastes, inpainted copies, activations), so its heap
fragments and its resident memory creeps with the number of audited images though it holds only
their uint8 pixels and maps. Measured on a ResNet-50 audit of 127 photos at 224 px (benchmarks/
scale.py's project, docs/audit.md "Memory at lab scale"): peak 1822 MiB with glibc's defaults,
1486 MiB with the threshold fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_=131072`, what
`fix_mmap_threshold` sets).

Written by hand because no library sets it: PyTorch leaves CPU allocation to the C library, and
swapping the allocator (jemalloc by LD_PRELOAD) is the user's choice, not a pip dependency.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's default before it starts rising


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (setting it stops the rise); whether it was
    set. Elsewhere (macOS, musl) the C library's own policy stays, as before: logged, not an error."""
    libc_name = platform.libc_ver()[0]
    if libc_name != "glibc":
        log.debug("not glibc (%s): the C library keeps its own mmap policy", libc_name or "unknown")
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
