#!/usr/bin/env bash
# Creates the servers' own virtualenvs under .services/ (git-ignored): SecantusDB pins its own
# pymongo and Swift brings eventlet & co, so neither may share the project's .venv.
# A marker file per venv records the pinned requirement, so a second run is instant and a
# changed pin rebuilds that venv.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SERVICES_DIR="$ROOT/.services"
PYTHON=${PYTHON:-python3}

make_venv() {
    local name=$1 requirement=$2
    local venv="$SERVICES_DIR/venv-$name"
    local marker="$venv/.installed"
    if [[ -f "$marker" && "$(cat "$marker")" == "$requirement" ]]; then
        return 0
    fi
    echo "install-venvs: building $venv ($requirement)" >&2
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    # shellcheck disable=SC2086 # a requirement may list several packages
    "$venv/bin/pip" install -q --disable-pip-version-check $requirement >&2
    printf '%s' "$requirement" >"$marker"
}

# Keystone serves its own API and runs a second Swift proxy with keystonemiddleware.
declare -A REQUIREMENTS=(
    [secantus]="SecantusDB==0.7.0b3"
    [swift]="swift==2.38.3"
    [keystone]="keystone==30.0.0 keystonemiddleware==13.0.1 swift==2.38.3"
)

# The venvs named as arguments (`make run` needs only secantus), else all, in parallel.
names=("$@")
((${#names[@]})) || names=(secantus swift keystone)
mkdir -p "$SERVICES_DIR"
pids=()
for name in "${names[@]}"; do
    make_venv "$name" "${REQUIREMENTS[$name]}" &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid"
done
