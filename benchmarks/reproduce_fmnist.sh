#!/usr/bin/env bash
# Tables 2 and 6 on Fashion-MNIST (benchmarks/reproduce_fmnist.py) on a bare GPU machine, in one command:
#
#   bash benchmarks/reproduce_fmnist.sh [--plan gpu] [reproduce_fmnist.py options] OUT
#
# The interpreter and the carried wheels are the device check's (benchmarks/device_check.sh --check_env:
# the machine's own python3 and jax where nvidia-smi sees a GPU, the wheels in .whl/ for what it lacks).
# The GPU machines have no Debian dataset package: copy the IDX files into the repository first and carry
# them with the wheels,
#
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/     # here (.data/ is git-ignored)
#   run(command="bash benchmarks/reproduce_fmnist.sh $OUT", carry=[".whl", ".data"], timeout_s=570)
#
# Writes OUT/reproduce_fmnist.{md,json} and the two plots; the md is rewritten after every row.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
[ $# -gt 0 ] || { echo "usage: bash benchmarks/reproduce_fmnist.sh [options] OUT" >&2; exit 2; }
out="${!#}"
options=("${@:1:$#-1}")
environment="$(bash "$repo/benchmarks/device_check.sh" --check_env)"
python="$(sed -n 's/^python=//p' <<<"$environment")"
export PYTHONPATH="$(sed -n 's/^PYTHONPATH=//p' <<<"$environment")"
export PYTHONUNBUFFERED=1
exec "$python" "$repo/benchmarks/reproduce_fmnist.py" --out "$out" "${options[@]}"
