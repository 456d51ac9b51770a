"""One merge in a process of its own, so that the peak RSS the merge reports is its own.

    python benchmarks/realistic/merge_child.py '{"method": ..., "models": [...], "out": ..., "options": {...}}'

Prints one JSON line: the merge's wall seconds, CPU seconds, peak RSS (all, anonymous, file-backed) and the
tensors it merged, copied and averaged for want of a statistic. Peak RSS is this process's VmHWM: the
``ru_maxrss`` of a process started by fork (or vfork) and exec also counts the parent's resident pages.
"""

from __future__ import annotations

import json
import sys
import time

import blockmerge
from blockmerge.engine import memory


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    memory.return_freed_blocks_to_the_os()  # as the blockmerge command does, once per process
    cpu = time.process_time()
    summary = blockmerge.merge(spec["method"], spec["models"], out=spec["out"], overwrite=True, **spec["options"])
    print(json.dumps({"seconds": round(summary.seconds, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
                      "peak_rss_bytes": memory.peak_rss_bytes(), "peak_rss_anon_bytes": summary.peak_rss_anon_bytes,
                      "peak_rss_file_bytes": summary.peak_rss_file_bytes, "tensors_merged": summary.tensors_merged,
                      "tensors_copied": summary.tensors_copied,
                      "tensors_averaged_missing_statistic": summary.tensors_averaged_missing_statistic}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
