#!/usr/bin/env bash
# The GPU benchmark: ViT-B/16 train step (bf16) for mae, partial and prmim at rho_d 0.5 on one
# GPU, reporting images/s, step time relative to MAE, peak memory and MFU. Writes
# benchmarks/results/gpu_<card>.{json,md}. About 3 minutes on an H100, install included.
#
#   bash benchmarks/gpu.sh [--batch N] [extra step_time.py flags]
#   PRMIM_PLATFORM=cpu bash benchmarks/gpu.sh --variant Ti/4 --image_size 32 --decoder_depth 1 --batch 4 --steps 2 --rounds 1
set -euo pipefail
cd "$(dirname "$0")/.."
platform="${PRMIM_PLATFORM:-}"
if [ -z "$platform" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then platform=cuda; else platform=cpu; fi
fi
bash launch/setup_env.sh "$platform" >&2
card=$(.venv/bin/python -c "import jax; print(jax.devices()[0].device_kind.lower().replace(' ', '_'))")
out="${PRMIM_BENCH_OUT:-benchmarks/results/gpu_${card}}"
# Let XLA take most of the card; the batch is what fills it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec .venv/bin/python benchmarks/step_time.py --variant B/16 --dtype bfloat16 --batch 512 --out "$out" "$@"
