"""Process-level memory settings shared by training and the benchmark."""

from __future__ import annotations

import ctypes
import ctypes.util


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def retain_freed_memory() -> bool:
    """Make glibc malloc serve large blocks from the heap and keep freed memory for reuse; True if applied.

    NOTE: by default glibc maps every block above its mmap threshold (dynamic, at most 32 MB) fresh
    from the kernel and unmaps it on free, so each training step pays page faults (and the kernel's
    zeroing) for its large tensors (activations, gradients, optimizer temporaries), and a step that
    allocated (tokens × vocab) logits took twice as long. A training process reaches the same peak every step, so
    keeping that memory costs nothing. Call once, at the start of the process that trains."""
    libc = _libc()
    if not hasattr(libc, "mallopt"):  # not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc malloc_trim); True if any were released.

    For a process that retains freed memory and then allocates many differently shaped tensors (the
    benchmark's standalone matmul timings): their freed blocks would otherwise stay resident, scattered
    between live ones. The next step re-faults what it needs, so call it outside timed regions."""
    libc = _libc()
    return hasattr(libc, "malloc_trim") and bool(libc.malloc_trim(0))
