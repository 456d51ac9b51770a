"""Memory as the OS and CUDA account for it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource

import torch


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (VmHWM; ``ru_maxrss`` where /proc has none, which after
    fork and exec also counts the parent's pages)."""
    return rss_parts().get("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_parts() -> dict[str, int]:
    """Current resident memory split into anonymous and file-backed pages (Linux /proc)."""
    parts = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM", "VmRSS"):
                    parts[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return parts


def peak_gpu_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def return_freed_blocks_to_the_os(threshold: int = 4 << 20, heap_kept: int = 64 << 20) -> bool:
    """Serve allocations above `threshold` bytes with mmap, so a freed block leaves the process; keep up to
    `heap_kept` bytes of freed heap for the small temporaries of the next slice.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which block
    buffers come from the heap and fragment it: RSS then grows with the model. Fixing the
    threshold keeps peak RSS set by the block budget. Fixing it also fixes the heap's trim
    threshold at 128 KiB: every freed slice temporary would go back to the OS and come back as
    fresh pages, faulted in and zeroed, which cost more than the merge arithmetic (2.5x for TIES).
    Threads share one arena: each thread's own arena kept its freed temporaries apart, fragmented, and
    doubled the peak of a pass over many small blocks (TIES's tie counts: 900 MiB against 520 MiB with one
    arena, at the same speed). Returns False where libc has no mallopt.

    It sets the whole process's allocator and environment, so the library never calls it: the process's
    owner calls it once, before its first merge (the `blockmerge` command, the git-theta merge driver and each
    Dask worker do).
    """
    use_huge_pages()
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return False
    return (bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, heap_kept))
            and bool(mallopt(_M_ARENA_MAX, 1)))


def return_free_heap() -> bool:
    """Give the heap's free pages back to the OS (malloc_trim), wherever they lie; False where libc has none."""
    trim = libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def libc_function(name: str):
    """The C library's function `name`, or None where there is no such library or function."""
    try:
        return getattr(_libc(), name)
    except (OSError, AttributeError):
        return None


def use_huge_pages() -> None:
    """Ask torch to back its large CPU allocations with transparent huge pages (unless the user chose).

    Every block buffer is a fresh mapping (see above); faulting it in 4 KiB pages cost more than
    the merge's arithmetic, 2 MiB pages cost a few percent of it. torch reads the variable when it
    first makes a large allocation, so this has no effect once it has made one.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
