#!/usr/bin/env bash
# The one-GPU check (see bench/gpu_check.py): ≤ 6 minutes on an H100/H200; --smoke runs it anywhere at tiny sizes.
#   bash bench/gpu_check.sh [--smoke] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 420 python bench/gpu_check.py "$@"
