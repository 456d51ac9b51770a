#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are not installed yet (apt-get, as root or through sudo).
# Prints one line and exits 2 when they are missing and cannot be installed.
set -uo pipefail
missing=()
for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
((${#missing[@]})) || exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    else
        echo "blockmerge: Debian packages missing and not root (no sudo to install them): ${missing[*]}" >&2
        exit 2
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "blockmerge: these packages are missing and there is no apt-get to install them: ${missing[*]}" >&2
    exit 2
fi
log=$(mktemp)
if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    echo "blockmerge: apt-get could not install ${missing[*]}: $(grep -E '^(E|W):' "$log" | tail -1)" >&2
    rm -f "$log"
    exit 2
fi
rm -f "$log"
