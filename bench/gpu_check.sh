#!/usr/bin/env bash
# The one-GPU check (see bench/gpu_check.py): ≤ 6 minutes on an H100/H200; --smoke runs it anywhere at tiny sizes.
#   bash bench/gpu_check.sh [--smoke] [--wheels DIR] [--out DIR] [--only PART,...]
# --wheels DIR: the wheels `bash bench/gpu_wheels.sh DIR` downloaded on a machine with a package index; when the
# project's pure-Python dependencies do not import here (an offline GPU image lacks fire, termcolor, nltk), they
# are installed from DIR without any network into a folder of their own, which the check then puts on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="" smoke=0 args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    --smoke) smoke=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
modules="fire termcolor nltk"
missing=$(python - "$modules" <<'PY'
import sys

missing = []
for name in sys.argv[1].split():
    try:
        __import__(name)
    except ImportError:
        missing.append(name)
print(" ".join(missing))
PY
)
if [ -n "$missing" ]; then
  if [ -z "$wheels" ]; then
    echo "error: these packages do not import here: $missing; on a machine with a package index run" \
         "'bash bench/gpu_wheels.sh DIR', copy DIR here, then: bash bench/gpu_check.sh --wheels DIR" >&2
    exit 2
  fi
  site="${TMPDIR:-/tmp}/gpu_check_site"
  echo "installing $missing from $wheels (offline) into $site"
  python -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$site" \
      --find-links "$wheels" $missing
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  export GPU_CHECK_FROM_WHEELS="$missing"
fi
# Each part has its own limit (bench/gpu_check.py: PARTS); these are their sums and a little more.
limit=420
[ "$smoke" = 1 ] && limit=1380
exec timeout "$limit" python bench/gpu_check.py ${args[@]+"${args[@]}"}
