#!/usr/bin/env bash
# The test suite from a fresh machine: system packages (git-lfs, the realistic benchmark's data), the Python
# packages, the linter, then pytest (arguments are passed on to it). Rerunning it installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "blockmerge: the tests need Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
    exit 2
fi
mapfile -t apt_packages < benchmarks/realistic/apt-packages.txt
bash scripts/system-packages.sh git git-lfs "${apt_packages[@]}"
# torch==2.13.0 is the version the suite runs on; see the README for where its CPU-only wheel comes from.
"$PYTHON" -m pip install -q torch==2.13.0 -e '.[test]'
"$PYTHON" -m pip install -q --no-deps --only-binary :all: --require-hashes -r benchmarks/realistic/requirements.txt
"$PYTHON" -m ruff check .
"$PYTHON" -c "from importlinter.cli import lint_imports_command; lint_imports_command()" --no-cache  # layers: pyproject.toml
exec "$PYTHON" -m pytest -q -p no:cacheprovider "$@"
