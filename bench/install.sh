#!/bin/sh
# Installs the peers and tools bench/run.py compares Muster against (Debian 12, as root or
# with sudo). Idempotent: packages already installed are left alone, apt runs only if needed.
#   restic, borgbackup: the peers;  zstd, age, tar: the plain pipeline;  time: /usr/bin/time
# py-spy (PyPI, into the project's venv) samples Muster's steps for the profile hints.
set -eu

PACKAGES="restic borgbackup zstd age tar time"
missing=""
for package in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    case "$status" in
        "install ok installed") ;;
        *) missing="$missing $package" ;;
    esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ -n "$missing" ]; then
    echo "bench/install.sh: installing$missing" >&2
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
else
    echo "bench/install.sh: $PACKAGES already installed" >&2
fi

VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
if [ -x "$VENV_BIN/python" ] && [ ! -x "$VENV_BIN/py-spy" ]; then
    echo "bench/install.sh: installing py-spy into .venv" >&2
    "$VENV_BIN/python" -m pip install -q py-spy
fi
