#!/usr/bin/env bash
# Usage: scripts/need_disk.sh GB WHAT
# Fails before an install when the repository's filesystem has less than GB gigabytes free, naming
# what needs them: pip's own "No space left on device" comes minutes later, halfway through.
set -euo pipefail
need=$1 what=$2
read -r free mount < <(df -Pk "$(dirname "$0")/.." | awk 'NR == 2 {print int($4 / 1048576), $6}')
if [ "$free" -lt "$need" ]; then
    echo "error: $what needs about $need GB free on $mount, which has $free GB:" >&2
    echo "       free some space (old clones' .venv and .venv-sglang take 17 GB each) and rerun" >&2
    exit 1
fi
