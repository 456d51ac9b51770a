"""What the realistic benchmark needs outside blockmerge: the Debian packages of ``apt-packages.txt`` and the
wheels of ``requirements.txt`` (``setup.sh`` installs both)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def debian_packages() -> list[str]:
    """The Debian packages the benchmark reads data from."""
    return (HERE / "apt-packages.txt").read_text().split()


def wheels() -> dict[str, str]:
    """Name → pinned version of each data/base-model wheel."""
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (HERE / "requirements.txt").read_text(), re.MULTILINE))


def _debian_installed(package: str) -> bool:
    try:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    except FileNotFoundError:
        return False
    return status.returncode == 0 and status.stdout.endswith("install ok installed")


def _wheel_installed(name: str, version: str) -> bool:
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def missing() -> list[str]:
    """The Debian packages and wheels (``name==version``) that are not installed."""
    return ([p for p in debian_packages() if not _debian_installed(p)]
            + [f"{n}=={v}" for n, v in wheels().items() if not _wheel_installed(n, v)])
