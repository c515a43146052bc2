#!/usr/bin/env bash
# Downloads the wheels the device check needs that the GPU machines lack, for their Python 3.12
# (x86-64 manylinux), into .whl/ (or DIR), on a machine that reaches the package registry:
#
#   bash benchmarks/device_wheels.sh [DIR]
#
# The GPU machines have jax 0.11 with its CUDA plugin, flax, optax, numpy, torch and
# transformers, and of the train step's other imports absl-py, PyYAML, cloudpickle, etils and
# protobuf; they lack ml-collections (configs) and grain with two of its dependencies
# (prmim_jax.methods imports grain). benchmarks/device_check.sh installs the ones that are
# missing there (--no-index --no-deps) into a temporary folder; .whl/ is git-ignored, so a
# device call names it in `carry`. Versions: requirements.txt's pins, else what .venv has.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
dest="${1:-$repo/.whl}"
python="${PYTHON:-$repo/.venv/bin/python}"

pinned() { sed -n "s/^$1==//p" "$repo/requirements.txt"; }
installed() { "$python" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$1"; }

wheels=(
  "ml-collections==$(pinned ml-collections)"
  "grain==$(pinned grain)"
  "array-record==$(installed array-record)"
  "portpicker==$(installed portpicker)"
)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
mkdir -p "$dest"
"$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${platforms[@]}" -d "$dest" "${wheels[@]}"
ls -l "$dest"
