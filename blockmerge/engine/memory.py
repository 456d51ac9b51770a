"""Memory as the OS and CUDA account for it."""

from __future__ import annotations

import resource

import torch


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (VmHWM)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
