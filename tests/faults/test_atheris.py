"""Runs the atheris target tests/faults/fuzz_safetensors_header.py for a bounded number of executions (seeded,
so the same inputs every time) and requires a clean exit: no input made blockmerge's safetensors reader raise
anything but BlockmergeError, crash or hang (libFuzzer's -timeout per input)."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faultkit import count, fault_figures  # noqa: F401  (session fixture: prints the figures)
from safetensors.torch import save

pytest.importorskip("atheris", reason="atheris is in the test extras (pip install atheris)")

TARGET = Path(__file__).with_name("fuzz_safetensors_header.py")
RUNS = 300_000
MAX_SECONDS = 40
DICTIONARY = ['"dtype"', '"shape"', '"data_offsets"', '"__metadata__"', '"F32"', '"F16"', '"BF16"', '"I64"',
              '"BOOL"', '"U8"', "18446744073709551616", "9223372036854775808", "4611686018427387904",
              "[" * 64, "1," * 32, "0,", "1e999", "NaN", "-1", "\\ud800"]


def seeds() -> list[bytes]:
    """Valid files (as they are, and as HEADER\\n--\\nDATA, the target's structured form)."""
    g = torch.Generator().manual_seed(0)
    files = [save({"w": torch.randn(3, 2, generator=g), "e": torch.zeros(0, 4), "i": torch.arange(3)},
                  metadata={"format": "pt"}),
             save({"h": torch.randn(2, generator=g).half(), "b": torch.tensor([True]), "one": torch.ones(1),
                   "s": torch.tensor(2.0, dtype=torch.bfloat16)})]
    out = list(files)
    for data in files:
        n = struct.unpack("<Q", data[:8])[0]
        out.append(data[8:8 + n] + b"\n--\n" + data[8 + n:])
    return out


def test_atheris_finds_nothing_but_clean_refusals(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, data in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(data)
    dictionary = tmp_path / "safetensors.dict"
    dictionary.write_text("".join(f"{_quote(token)}\n" for token in DICTIONARY))
    result = subprocess.run([sys.executable, str(TARGET), f"-runs={RUNS}", f"-max_total_time={MAX_SECONDS}",
                             "-seed=1", "-timeout=10", "-rss_limit_mb=4096", f"-dict={dictionary}",
                             f"-artifact_prefix={tmp_path}/", str(corpus)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=MAX_SECONDS + 120)
    output = result.stdout + result.stderr
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert result.returncode == 0 and not crashes, f"{crashes}\n{output[-4000:]}"
    done = re.search(r"Done (\d+) runs in (\d+) second", output)
    assert done, output[-2000:]
    runs = int(done.group(1))
    count("atheris executions (safetensors header)", runs)
    assert runs >= 10_000, output[-2000:]


def _quote(token: str) -> str:
    """A libFuzzer dictionary entry: a double-quoted string with \\ and " escaped."""
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'
