#!/usr/bin/env bash
# Installs what benchmarks/realistic needs on a fresh Debian/Ubuntu machine; rerunning it changes nothing.
# Network is needed only here (Debian archive, PyPI); data.py and finetune.py then run offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}

APT_PACKAGES=(fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-cs fortunes-eo fortunes-br wordnet-base)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install torch==2.13.0
"$PYTHON" -c "import blockmerge" 2>/dev/null || "$PYTHON" -m pip install -e .
"$PYTHON" -m pip install --no-deps --only-binary :all: --require-hashes -r benchmarks/realistic/requirements.txt
