#!/usr/bin/env bash
# Every GPU figure of issue 17 in one call (bench/gpu.py): light and full recipe steps, eager and
# compiled, next to a backbone-only step; the VD's share at k = 1024/2048/8192; the loader with CPU
# and GPU decoding at the node's cores; peak memory. One JSON results file (default results/gpu.json).
# Under 8 minutes on one H100/H200. Usage: bench/gpu.sh [--out FILE] [any bench/gpu.py option]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export PYTHONPATH="$root/platform${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # the benchmark downloads nothing (random weights of the recipes' shapes)
cd "$root"
exec timeout 480 "$python" "$here/gpu.py" "$@"
