"""atheris (libFuzzer) target: coverage-guided fuzzing of blockmerge's safetensors reader.

    python tests/faults/fuzz_safetensors_header.py [libFuzzer flags: -runs=N -max_total_time=S -seed=N] [CORPUS]

Each input becomes the bytes of a file, held in a memfd (no file-system writes per input): as it is, or, when
it holds the separator b"\n--\n", as HEADER--DATA with the 8-byte header length computed here (so mutations
of the header JSON are not all refused at the length check). The header is validated by
`blockmerge.engine.safetensors_io.read_header` (through `SafetensorsFile`), and when it is accepted every
tensor is read back the way a merge reads it. Accepted outcomes: success, or BlockmergeError.
Any other exception is a crash (libFuzzer saves the input under -artifact_prefix and exits non-zero).
blockmerge is instrumented for coverage; torch and the standard library are not.
tests/faults/test_atheris.py runs it for a bounded time.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["blockmerge"]):
    from blockmerge.engine.safetensors_io import SafetensorsFile
    from blockmerge.errors import BlockmergeError

FD = os.memfd_create("fuzz.safetensors")
PATH = Path(f"/proc/self/fd/{FD}")
SEPARATOR = b"\n--\n"


def as_file(data: bytes) -> bytes:
    header, sep, payload = data.partition(SEPARATOR)
    return struct.pack("<Q", len(header)) + header + payload if sep else data


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris looks for
    data = as_file(data)
    os.ftruncate(FD, 0)
    os.pwrite(FD, data, 0)
    try:
        f = SafetensorsFile(PATH)
    except BlockmergeError:
        return
    try:
        for name, (spec, _) in f.entries.items():
            f.read(name, 0, spec.rows)
    except BlockmergeError:
        return
    finally:
        f.close()


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
