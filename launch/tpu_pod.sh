#!/usr/bin/env bash
# Runs the training command on every worker of a Cloud TPU VM (a pod slice or a
# single host).
#
#   bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--skip_setup]
#       [--dry_run] CONFIG WORKDIR [main.py flags...]
#
# 1. packs this repository (without .venv, .git, caches and workdirs/) and copies
#    it to every worker (gcloud compute tpus tpu-vm scp --worker=all), where it
#    replaces ~/prmim_jax except its .venv;
# 2. creates the environment on every worker (bash launch/setup_env.sh tpu);
#    --skip_setup leaves the environment as it is;
# 3. runs, on every worker at once (gcloud compute tpus tpu-vm ssh --worker=all),
#      cd prmim_jax && .venv/bin/python -m prmim_jax.main --config CONFIG --workdir WORKDIR [flags...]
#    jax.distributed.initialize() finds the other workers itself.
# CONFIG must be inside this repository (it is named relative to the repository
# root on the workers). WORKDIR is typically gs://BUCKET/PATH: every worker must
# reach the same checkpoints. The run stays attached to this terminal; start
# the script inside tmux or screen for long runs. --dry_run (or DRY_RUN=1) prints
# the commands and runs nothing.
set -euo pipefail

prog="launch/tpu_pod.sh"
usage="usage: bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--skip_setup] [--dry_run] CONFIG WORKDIR [main.py flags...]"
remote_dir="prmim_jax" # on each worker, relative to the home directory

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

dry_run=0
case "${DRY_RUN:-0}" in "" | 0 | false | no) ;; *) dry_run=1 ;; esac
tpu=""
zone=""
project=""
skip_setup=0
positional=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p;}' "${BASH_SOURCE[0]}"; exit 0 ;;
    --dry_run | --dry-run) dry_run=1 ;;
    --skip_setup) skip_setup=1 ;;
    --tpu) [ $# -ge 2 ] || die "$1 needs a value"; tpu="$2"; shift ;;
    --zone) [ $# -ge 2 ] || die "$1 needs a value"; zone="$2"; shift ;;
    --project) [ $# -ge 2 ] || die "$1 needs a value"; project="$2"; shift ;;
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --)
      shift
      for arg in "$@"; do add_argument "$arg" after_dashes; done
      break ;;
    *) add_argument "$1" ;;
  esac
  shift
done

[ -n "$tpu" ] || die "missing --tpu NAME"
[ -n "$zone" ] || die "missing --zone ZONE"
take_config_and_workdir
config_abs="$(cd "$(dirname "$config_file")" && pwd -P)/$(basename "$config_file")"
case "$config_abs" in
  "$repo"/*) config_rel="${config_abs#"$repo"/}" ;;
  *) die "CONFIG must be inside the repository ($repo), which is what the workers get: $config_file" ;;
esac
case "$workdir" in
  gs://*) ;;
  *) echo "$prog: warning: WORKDIR '$workdir' is not a gs:// path; each worker writes to its own disk" >&2 ;;
esac

# Prints the command (--dry_run), or echoes it to stderr and runs it.
run() {
  if [ "$dry_run" = 1 ]; then
    join "$@"
  else
    echo "+ $(join "$@")" >&2
    "$@"
  fi
}

where=(--zone="$zone" --worker=all)
[ -z "$project" ] || where+=(--project="$project")
tarball="${TMPDIR:-/tmp}/prmim_jax-$tpu-$$.tar.gz"
unpack="mkdir -p $remote_dir && find $remote_dir -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +"
unpack+=" && tar -xzf $remote_dir.tar.gz -C $remote_dir && rm $remote_dir.tar.gz"
[ "$skip_setup" = 1 ] || unpack+=" && bash $remote_dir/launch/setup_env.sh tpu"
main=(.venv/bin/python -m prmim_jax.main --config "$config_rel$config_arg" --workdir "$workdir")
train="cd $remote_dir && $(join "${main[@]}" ${extra[@]+"${extra[@]}"})"

[ "$dry_run" = 1 ] || trap 'rm -f "$tarball"' EXIT
run tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude=./workdirs --exclude=./tmp \
  --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache --exclude='*.egg-info' -czf "$tarball" .
run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:$remote_dir.tar.gz" "${where[@]}"
run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command="$unpack"
run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command="$train"
[ "$dry_run" = 0 ] || join rm -f "$tarball"
