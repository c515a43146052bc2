#!/usr/bin/env bash
# Runs the training command on every worker of a Cloud TPU VM (a pod slice or a
# single host).
#
#   bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--grace S] [--skip_setup]
#       [--dry_run] CONFIG WORKDIR [main.py flags...]
#
# 1. packs this repository (without .venv, .git, caches and workdirs/) and copies
#    it to every worker (gcloud compute tpus tpu-vm scp --worker=all), where it
#    replaces ~/prmim_jax except its .venv;
# 2. creates the environment on every worker (bash launch/setup_env.sh tpu);
#    --skip_setup leaves the environment as it is;
# 3. runs, on every worker at once (gcloud compute tpus tpu-vm ssh --worker=all),
#      cd prmim_jax && echo $$ >.train.pid && exec .venv/bin/python -m prmim_jax.main \
#          --config CONFIG --workdir WORKDIR [flags...]
#    jax.distributed.initialize() finds the other workers itself.
# SIGTERM or Ctrl-C to this script sends SIGTERM to the training process on every
# worker (by its .train.pid, over ssh): they save a checkpoint at a step they agree
# on and exit 0. The script waits up to --grace S seconds (default 120) for them,
# then kills them (SIGKILL); a second Ctrl-C kills them at once. A failing worker
# prints "process I of N failed: ..." and the others stop within seconds.
# CONFIG must be inside this repository (it is named relative to the repository
# root on the workers). WORKDIR is typically gs://BUCKET/PATH: every worker must
# reach the same checkpoints. The run stays attached to this terminal; start
# the script inside tmux or screen for long runs. --dry_run (or DRY_RUN=1) prints
# the commands and runs nothing.
set -euo pipefail

prog="launch/tpu_pod.sh"
usage="usage: bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--grace S] [--skip_setup] [--dry_run] CONFIG WORKDIR [main.py flags...]"
remote_dir="prmim_jax" # on each worker, relative to the home directory

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

tpu=""
zone=""
project=""
grace=120
value_options=(--tpu=tpu --zone=zone --project=project --grace=grace)
parse_arguments "$@"

require_option "--tpu NAME" "$tpu"
require_option "--zone ZONE" "$zone"
require_seconds --grace "$grace"
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

where=(--zone="$zone" --worker=all)
[ -z "$project" ] || where+=(--project="$project")
tarball="${TMPDIR:-/tmp}/prmim_jax-$tpu-$$.tar.gz"
unpack="mkdir -p $remote_dir && find $remote_dir -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +"
unpack+=" && tar -xzf $remote_dir.tar.gz -C $remote_dir && rm $remote_dir.tar.gz"
[ "$skip_setup" = 1 ] || unpack+=" && bash $remote_dir/launch/setup_env.sh tpu"
main=(.venv/bin/python -m prmim_jax.main --config "$config_rel$config_arg" --workdir "$workdir")
# The training process keeps the shell's pid (exec), which .train.pid holds for signal_workers.
train="cd $remote_dir && echo \$\$ >.train.pid && exec $(join "${main[@]}" ${extra[@]+"${extra[@]}"})"

[ "$dry_run" = 1 ] || trap 'rm -f "$tarball"' EXIT
run tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude=./workdirs --exclude=./tmp \
  --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache --exclude='*.egg-info' -czf "$tarball" .
run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:$remote_dir.tar.gz" "${where[@]}"
run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command="$unpack"
train_command=(gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command="$train")
if [ "$dry_run" = 1 ]; then
  join "${train_command[@]}"
  join rm -f "$tarball"
  exit 0
fi

# SIGNAL to the training process on every worker; a worker whose process has ended (its pid may since
# name another process) is left alone.
signal_workers() {
  local pid="pid=\$(cat $remote_dir/.train.pid) && grep -qa prmim_jax.main /proc/\$pid/cmdline"
  run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command="$pid && kill -s $1 \$pid || true" || true
}

started=0  # 1 from just before the training command starts
stopping=0 # 1 once the workers were sent SIGTERM
deadline=0 # when they are killed if still running ($SECONDS)
killed=0
on_signal() { # NAME
  if [ "$started" = 0 ]; then
    echo "$prog: got SIG$1 before the training command started: not starting it" >&2
    exit 1
  fi
  if [ "$stopping" = 1 ]; then
    if [ "$1" = INT ] && [ "$killed" = 0 ]; then
      echo "$prog: SIGINT again: killing the training processes now" >&2
      killed=1
      signal_workers KILL
    fi
    return
  fi
  stopping=1
  deadline=$((SECONDS + grace + 1)) # $SECONDS counts whole seconds: at least the grace period
  echo "$prog: got SIG$1: sending SIGTERM to the training process on every worker; waiting up to ${grace}s" \
    "for them (a checkpoint is saved at a step they agree on) before killing them" >&2
  signal_workers TERM
}

# The traps are set before the training command starts, so no signal falls between the two. The command runs
# in the background (which also keeps a Ctrl-C on the terminal from reaching gcloud and cutting the workers'
# output short), so that the traps run at once.
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
echo "+ $(join "${train_command[@]}")" >&2
started=1
"${train_command[@]}" &
training=$!
while kill -0 "$training" 2>/dev/null; do
  kill_after_deadline "the workers still run after the ${grace}s grace period; killing them (SIGKILL)" \
    signal_workers KILL
  sleep 0.5
done
status=0
wait "$training" || status=$?
[ "$status" = 0 ] || echo "$prog: the training command failed (status $status); a failing worker's own error" \
  "is its line 'process I of N failed: ...' above" >&2
exit "$status"
