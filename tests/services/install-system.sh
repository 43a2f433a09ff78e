#!/usr/bin/env bash
# Installs the Debian packages the real test services need (RabbitMQ, memcached for Swift's
# tempauth), the archivers the backup code drives (zstd, age, GNU tar) and python3-venv
# (Debian's python3 makes no venv without it); or only the packages named as arguments
# (`make run` needs no server).
# Idempotent and fast: `apt-get update` runs only when something is actually missing.
set -euo pipefail

if (($# > 0)); then
    PACKAGES=("$@")
else
    PACKAGES=(python3-venv rabbitmq-server memcached zstd age tar)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    SUDO=sudo
else
    SUDO=
fi

echo "install-system: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
$SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
