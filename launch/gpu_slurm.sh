#!/usr/bin/env bash
# Submits the training command as a SLURM batch job on GPU nodes.
#
#   bash launch/gpu_slurm.sh --nodes N --gpus_per_node G [--per gpu|node]
#       [--partition P] [--time T] [--cpus_per_task C] [--job_name NAME] [--grace S]
#       [--sbatch_arg ARG]... [--skip_setup] [--dry_run] CONFIG WORKDIR [main.py flags...]
#
# Writes an sbatch script to WORKDIR/slurm/ (or workdirs/slurm/ in this repository
# when WORKDIR is a URL such as gs://...; the job's output goes beside it) and
# submits it with sbatch. The job
# 1. creates the environment once per node (srun, one task per node:
#    bash launch/setup_env.sh cuda); --skip_setup leaves it as it is;
# 2. runs under srun, from this repository,
#      $VENV/bin/python -m prmim_jax.main --config CONFIG --workdir WORKDIR [flags...]
#    --per gpu (default): G tasks per node, task I of a node sees only the node's
#    GPU I (CUDA_VISIBLE_DEVICES from SLURM_LOCALID); --per node: one task per
#    node that sees all G GPUs. XLA_FLAGS starts with launch/lib.sh's GPU flags.
# jax.distributed.initialize() reads SLURM's variables, so no coordinator flags.
# Stopping: SLURM sends the tasks SIGTERM --grace S seconds (default 120) before the
# time limit (#SBATCH --signal=TERM@S), and so does `scancel --signal=TERM JOBID`:
# they save a checkpoint at a step they agree on and exit 0. When one task fails,
# srun kills the others at once (--kill-on-bad-exit=1), so the job's output ends
# with that task's own error ("process I of N failed: ..."); when one ends, the
# others get S seconds to end too (--wait=S).
# The repository and the environment ($PRMIM_VENV, default .venv here) must be on a
# filesystem every node mounts at the same path; with a shared environment, run
# `bash launch/setup_env.sh cuda` once before the first multi-node job, or pass
# --skip_setup, so that nodes do not install into it concurrently.
# --sbatch_arg passes one more option to sbatch (--sbatch_arg=--account=A).
# --dry_run (or DRY_RUN=1) prints the commands and the sbatch script and runs nothing.
set -euo pipefail

prog="launch/gpu_slurm.sh"
usage="usage: bash launch/gpu_slurm.sh --nodes N --gpus_per_node G [--per gpu|node] [--partition P] [--time T] [--cpus_per_task C] [--job_name NAME] [--grace S] [--sbatch_arg ARG]... [--skip_setup] [--dry_run] CONFIG WORKDIR [main.py flags...]"

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Makes a local path absolute (the job runs from the repository root); leaves URLs.
absolute() {
  case "$1" in
    /* | *://*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$PWD/${1#./}" ;;
  esac
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

nodes=""
gpus=""
per="gpu"
partition=""
time_limit=""
cpus_per_task=""
job_name="prmim_jax"
grace=120
sbatch_args=()
value_options=(
  --nodes=nodes --gpus_per_node=gpus --per=per --partition=partition --time=time_limit
  --cpus_per_task=cpus_per_task --job_name=job_name --grace=grace "--sbatch_arg=sbatch_args[]"
)
parse_arguments "$@"

require_option "--nodes N" "$nodes"
require_positive --nodes "$nodes"
require_option "--gpus_per_node G" "$gpus"
require_positive --gpus_per_node "$gpus"
case "$per" in gpu | node) ;; *) die "--per must be gpu or node, got '$per'" ;; esac
[ -z "$cpus_per_task" ] || require_positive --cpus_per_task "$cpus_per_task"
case "$job_name" in "" | *[!A-Za-z0-9_.-]*) die "--job_name must be letters, digits, '_', '.' or '-', got '$job_name'" ;; esac
require_seconds --grace "$grace"
take_config_and_workdir
config="$(absolute "$config")"
workdir="$(absolute "$workdir")"

venv="${PRMIM_VENV:-.venv}"
[[ "$venv" == /* ]] || venv="$repo/$venv"
case "$workdir" in
  *://*) job_dir="$repo/workdirs/slurm" ;;
  *) job_dir="$workdir/slurm" ;;
esac
case "$job_dir" in *[[:space:]]*) die "#SBATCH --output cannot name a path with spaces: $job_dir" ;; esac
script="$job_dir/$job_name-$(date +%Y%m%d-%H%M%S).sbatch"

if [ "$per" = gpu ]; then
  tasks_per_node="$gpus"
  # Task I of a node takes the node's I-th allocated GPU (unless SLURM already bound
  # one GPU to each task); JAX then numbers it 0. Expanded by the task's shell:
  # shellcheck disable=SC2016
  bind='IFS=, read -r -a gpus <<<"${CUDA_VISIBLE_DEVICES:-}"; case ${#gpus[@]} in 0) export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID ;; 1) ;; *) export CUDA_VISIBLE_DEVICES=${gpus[$SLURM_LOCALID]} ;; esac; export JAX_LOCAL_DEVICE_IDS=0; exec "$@"'
else
  tasks_per_node=1
  # JAX would otherwise give the node's single task only GPU $SLURM_LOCALID.
  device_ids="0"
  for ((i = 1; i < gpus; i++)); do device_ids+=",$i"; done
  bind="export JAX_LOCAL_DEVICE_IDS=$device_ids; exec \"\$@\""
fi
# A failing task takes the others down at once; after a task ends, the rest get the grace period.
train=(srun --kill-on-bad-exit=1 --wait="$grace")
# srun no longer inherits sbatch's --cpus-per-task (SLURM 22.05).
[ -z "$cpus_per_task" ] || train+=(--cpus-per-task="$cpus_per_task")
train+=(bash -c "$bind" bash
  "$venv/bin/python" -m prmim_jax.main --config "$config" --workdir "$workdir" ${extra[@]+"${extra[@]}"})

sbatch_script() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  echo "#SBATCH --gpus-per-node=$gpus"
  [ -z "$cpus_per_task" ] || echo "#SBATCH --cpus-per-task=$cpus_per_task"
  [ -z "$partition" ] || echo "#SBATCH --partition=$partition"
  [ -z "$time_limit" ] || echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --signal=TERM@$grace"
  echo "#SBATCH --output=$job_dir/%x-%j.out"
  for arg in ${sbatch_args[@]+"${sbatch_args[@]}"}; do echo "#SBATCH $arg"; done
  echo "# Written by launch/gpu_slurm.sh: one process per $per."
  echo "set -euo pipefail"
  join cd "$repo"
  join export PRMIM_VENV="$venv"
  local xla_flags
  xla_flags="$(xla_gpu_flags)"
  if [ -n "$xla_flags" ]; then
    echo "# XLA's GPU flags (launch/lib.sh), before the job's own XLA_FLAGS, which win."
    # shellcheck disable=SC2016  # expanded when the job runs
    echo "export XLA_FLAGS=$(quote "$xla_flags")"'"${XLA_FLAGS:+ $XLA_FLAGS}"'
  fi
  if [ "$skip_setup" = 0 ]; then
    echo "# The environment, once per node."
    join srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 bash launch/setup_env.sh cuda
  fi
  echo "# Training; jax.distributed.initialize() reads SLURM's variables."
  join "${train[@]}"
}

if [ "$dry_run" = 1 ]; then
  join mkdir -p "$job_dir"
  echo "cat > $(quote "$script") <<'PRMIM_SBATCH_EOF'"
  sbatch_script
  echo "PRMIM_SBATCH_EOF"
  join sbatch "$script"
  exit 0
fi

if [ "$skip_setup" = 0 ] && [ "$nodes" -gt 1 ] && [ ! -x "$venv/bin/python" ]; then
  echo "$prog: warning: $venv does not exist yet; if it is on a shared filesystem, create it first" \
    "(bash launch/setup_env.sh cuda) so that $nodes nodes do not install into it at once" >&2
fi
mkdir -p "$job_dir"
sbatch_script >"$script"
echo "$prog: wrote $script" >&2
echo "+ $(join sbatch "$script")" >&2
sbatch "$script"
