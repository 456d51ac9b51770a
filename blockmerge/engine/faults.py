"""Test-only fault injection: `BLOCKMERGE_FAULT=POINT:N` SIGKILLs the process the N-th time it reaches POINT;
`BLOCKMERGE_FAULT=POINT:N:pause` stops there instead (sleeps), for a test to signal the process.

Points: `pass` (a reduction pass folded a block), `write` (a block's bytes are written, its journal
entry not yet), `block` (a block is written and journaled), `commit` (the output is complete and
synced, not yet moved into place), `swap` (with --overwrite of a directory: the old output moved aside,
the new one not yet in place; a file replaces the old one in one rename).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

ENV = "BLOCKMERGE_FAULT"
_reached: Counter[str] = Counter()


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    count, _, action = rest.partition(":")
    if target == name:
        _reached[name] += 1
        if _reached[name] >= int(count or 1):
            if action == "pause":
                time.sleep(3600)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
