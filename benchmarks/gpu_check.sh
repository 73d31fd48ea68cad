#!/usr/bin/env bash
# The prepared GPU check (issue 13): the suite's checks on one GPU machine, a PASS / FAIL / SKIP table at
# the end, exit status 1 when a check fails. The checks themselves are in benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine (a few minutes on one H200)
#   bash benchmarks/gpu_check.sh --cpu                # the same checks, tiny models, on the CPU (its self-test)
#   bash benchmarks/gpu_check.sh --python PATH --out DIR
#
# The interpreter: --python PATH, else $FSCL_PYTHON, else the repository's .venv/bin/python, else python.
# --out DIR keeps the logs, the generated data and the runs there (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python="${FSCL_PYTHON:-}"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) python="$2"; shift 2 ;;
    --python=*) python="${1#*=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python; fi
fi
exec "$python" benchmarks/gpu_check.py ${args[@]+"${args[@]}"}
