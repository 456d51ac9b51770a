#!/usr/bin/env bash
# Installs what benchmarks/realistic needs on a fresh Debian/Ubuntu machine; rerunning it changes nothing.
# Network is needed only here (Debian archive, PyPI); data.py and finetune.py then run offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}

mapfile -t apt_packages < benchmarks/realistic/apt-packages.txt
bash scripts/system-packages.sh "${apt_packages[@]}"
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install torch==2.13.0
"$PYTHON" -c "import blockmerge" 2>/dev/null || "$PYTHON" -m pip install -e .
"$PYTHON" -m pip install --no-deps --only-binary :all: --require-hashes -r benchmarks/realistic/requirements.txt
