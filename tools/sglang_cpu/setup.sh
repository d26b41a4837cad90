#!/usr/bin/env bash
# Create or update .venv-sglang from tools/sglang_cpu/requirements.txt; a no-op when nothing changed.
# Needs .venv (scripts/setup_env.sh) first: its base Python 3.12 is reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
req=tools/sglang_cpu/requirements.txt
stamp=".venv-sglang/.installed-$(sha256sum "$req" | cut -c1-16)"
[ -f "$stamp" ] && exit 0
if [ ! -x .venv-sglang/bin/python ]; then
    scripts/need_disk.sh 14 "a new .venv-sglang (SGLang with its own torch and kernels: 11 GB, and pip's downloads)"
    "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" -m venv .venv-sglang
    .venv-sglang/bin/python -m pip install -q --upgrade pip
fi
echo "installing SGLang into .venv-sglang for the real-server CPU tests (first run: about 6 minutes, 11 GB)"
.venv-sglang/bin/python -m pip install -q -r "$req"
touch "$stamp"
