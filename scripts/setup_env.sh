#!/usr/bin/env bash
# Create or update .venv (Python 3.12) from the pinned requirements; a no-op when nothing changed.
# Usage: scripts/setup_env.sh [extra-requirements-file ...]   (*-nodeps.txt files install with --no-deps)
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    # A candidate counts only if it runs and is 3.12 (a pyenv shim can exist and still refuse).
    for cand in ${PYTHON:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3 python3; do
        if "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
            command -v "$cand"
            return
        fi
    done
    echo "no working Python 3.12 found: megatron-core >= 0.17 needs it; set PYTHON=/path/to/python3.12" >&2
    exit 1
}

if [ ! -x .venv/bin/python ]; then
    scripts/need_disk.sh 9 "a new .venv (torch with its CUDA libraries: 6.4 GB, and pip's downloads)"
    python=$(find_python)
    "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
reqs=(requirements.txt "$@")
stamp=".venv/.installed-$(cat "${reqs[@]}" pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "installing ${reqs[*]} into .venv (first run downloads torch: a few minutes)"
    args=() nodeps=()
    # A *-nodeps.txt file names packages installed without their declared dependencies (which
    # include CUDA-only builds); what they really need is pinned in the other files.
    for r in "${reqs[@]}"; do
        if [[ $r == *-nodeps.txt ]]; then nodeps+=(-r "$r"); else args+=(-r "$r"); fi
    done
    .venv/bin/python -m pip install -q "${args[@]}"
    if [ ${#nodeps[@]} -gt 0 ]; then .venv/bin/python -m pip install -q --no-deps "${nodeps[@]}"; fi
    .venv/bin/python -m pip install -q --no-deps -e .
    touch "$stamp"
fi
