"""The labeler process's allocator: keep the large buffers that each image's decode and encode
free, rather than hand them back to the kernel and fault fresh zeroed pages in for the next image.

glibc serves a buffer over its mmap threshold with a new mapping and unmaps it on free, and trims
the heap's free top; a 3.4 MP photo's RGB array, its PIL buffer and its label are 7-14 MB each,
so every image paid their page faults again: ~4 CPU-ms of 35 per SA-1B photo on the labeler's
CPU side (docs/BENCHMARKS.md, "The labeler's CPU side"). With buffers up to the largest heap
buffer glibc allows served from the heap, and the heap's free top kept, the next image reuses
the same pages. Peak memory is unchanged (the pixel budget bounds it); the resident size stays
at its peak instead of falling between shards."""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST_HEAP_BUFFER = 32 << 20   # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
KEPT_FREE_TOP = 1 << 30


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc for this process; False where it is not glibc (the allocator is then
    left as it is)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
        gnu = ctypes.CDLL(None).gnu_get_libc_version   # glibc only: musl's mallopt is a no-op
    except (OSError, AttributeError):
        return False
    del gnu
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BUFFER)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_FREE_TOP))
