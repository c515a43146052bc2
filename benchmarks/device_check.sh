#!/usr/bin/env bash
# The GPU device check, one command on a bare GPU machine (no package registry needed):
#
#   bash benchmarks/device_check.sh [--budget S] [--phases vit_b,torch,vit_l,flags] OUT
#   bash benchmarks/device_check.sh --smoke OUT      # CPU dry run with tiny shapes (what CI runs)
#   bash benchmarks/device_check.sh --check_env      # prepare the interpreter, say what it uses, stop
#
# Writes OUT/device_check.md (the tables), OUT/device_check.json and OUT/device_check.log; about
# 7.5 minutes on an H100 (--budget 430 seconds for the phases, compiles included). What it
# measures: benchmarks/device_check.py's docstring. The interpreter is $PYTHON, else, where
# nvidia-smi sees a GPU, the machine's python3 with its own jax, flax, optax, torch and
# transformers (no install step), else the project's .venv. Where an import the check needs is
# missing, the wheels carried in .whl/ ($PRMIM_WHEELS; bash benchmarks/device_wheels.sh downloads
# them on a machine with a registry) whose distributions are not installed go into a temporary
# site folder (pip install --no-index --no-deps --target) put on PYTHONPATH.
# $PRMIM_CHECK_IMPORTS lists the modules that must import (default: the train step's; the torch phase
# needs the machine's torch and transformers, which no wheel here replaces).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
usage="usage: bash benchmarks/device_check.sh [--smoke] [--budget S] [--phases LIST] OUT | --check_env"

check_env=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p;}' "${BASH_SOURCE[0]}"; exit 0 ;;
    --check_env) check_env=1 ;;
    *) args+=("$1") ;;
  esac
  shift
done
[ "$check_env" = 1 ] || [ ${#args[@]} -gt 0 ] || { echo "$usage" >&2; exit 2; }

if [ -n "${PYTHON:-}" ]; then
  python="$PYTHON"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  python="$(command -v python3)"
else
  python="$repo/.venv/bin/python"
fi
[ -x "$python" ] || { echo "device_check: no interpreter at $python (set PYTHON)" >&2; exit 2; }

# The repository is imported from its working tree; the GPU machine has no install of it.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
imports="${PRMIM_CHECK_IMPORTS:-prmim_jax.train_step prmim_jax.methods}"
importable() {
  # shellcheck disable=SC2086  # one module name per word
  "$python" -c 'import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)' $imports 2>&1
}

if ! missing="$(importable)"; then
  echo "device_check: an import failed: $(tail -n 1 <<<"$missing")" >&2
  wheels="${PRMIM_WHEELS:-$repo/.whl}"
  mapfile -t carried < <("$python" "$repo/benchmarks/device_check.py" --missing_wheels "$wheels")
  [ ${#carried[@]} -gt 0 ] || { echo "device_check: no carried wheel in $wheels provides it" >&2; exit 1; }
  site="$(mktemp -d "${TMPDIR:-/tmp}/device_check_site.XXXXXX")"
  echo "device_check: installing ${#carried[@]} carried wheels into $site: ${carried[*]##*/}" >&2
  "$python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$site" "${carried[@]}" >&2
  export PYTHONPATH="$PYTHONPATH:$site"
  if ! missing="$(importable)"; then
    echo "device_check: still failing after the carried wheels: $missing" >&2
    exit 1
  fi
fi

if [ "$check_env" = 1 ]; then
  echo "python=$python"
  echo "PYTHONPATH=$PYTHONPATH"
  exit 0
fi
exec "$python" "$repo/benchmarks/device_check.py" "${args[@]}"
