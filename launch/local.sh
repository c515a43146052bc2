#!/usr/bin/env bash
# Runs the training command on this machine.
#
#   bash launch/local.sh [--processes N] [--port P] [--skip_setup] [--dry_run]
#       CONFIG WORKDIR [main.py flags...]
#
# Creates the environment (bash launch/setup_env.sh PLATFORM; PLATFORM is
# $PRMIM_PLATFORM, else cuda where nvidia-smi exists, else cpu), then runs
#   $VENV/bin/python -m prmim_jax.main --config CONFIG --workdir WORKDIR [flags...]
# from the current directory. --processes N starts N processes on this machine,
# each with --coordinator_address localhost:PORT --num_processes N --process_id I
# (a free port unless --port) and its log in WORKDIR/logs/process_I.log; on cuda,
# process I sees only GPU I. On cuda, XLA_FLAGS starts with launch/lib.sh's GPU
# flags. The script waits for all of them, stops the others
# when one fails, and exits non-zero if any failed. --dry_run (or DRY_RUN=1)
# prints the commands and runs nothing. Launch options may appear anywhere before
# `--`; everything after CONFIG WORKDIR that is not one goes to main.py.
set -euo pipefail

prog="launch/local.sh"
usage="usage: bash launch/local.sh [--processes N] [--port P] [--skip_setup] [--dry_run] CONFIG WORKDIR [main.py flags...]"

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

dry_run=0
case "${DRY_RUN:-0}" in "" | 0 | false | no) ;; *) dry_run=1 ;; esac
processes=1
port=""
skip_setup=0
positional=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p;}' "${BASH_SOURCE[0]}"; exit 0 ;;
    --dry_run | --dry-run) dry_run=1 ;;
    --skip_setup) skip_setup=1 ;;
    --processes) [ $# -ge 2 ] || die "$1 needs a value"; processes="$2"; shift ;;
    --port) [ $# -ge 2 ] || die "$1 needs a value"; port="$2"; shift ;;
    --processes=*) processes="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --)
      shift
      for arg in "$@"; do add_argument "$arg" after_dashes; done
      break ;;
    *) add_argument "$1" ;;
  esac
  shift
done

take_config_and_workdir
case "$processes" in "" | *[!0-9]* | 0*) die "--processes must be a positive integer, got '$processes'" ;; esac
case "$port" in *[!0-9]* | 0*) die "--port must be a port number, got '$port'" ;; esac
[ "$processes" = 1 ] || [[ "$workdir" != *://* ]] \
  || die "--processes writes its logs under WORKDIR, which must be a local path"

if [ -n "${PRMIM_PLATFORM:-}" ]; then
  platform="$PRMIM_PLATFORM"
elif command -v nvidia-smi >/dev/null 2>&1; then
  platform="cuda"
else
  platform="cpu"
fi
case "$platform" in cpu | cuda | tpu) ;; *) die "PRMIM_PLATFORM must be cpu, cuda or tpu, got '$platform'" ;; esac

# With several processes on cuda, process I sees only the I-th visible GPU.
gpus=()
if [ "$platform" = cuda ] && [ "$processes" -gt 1 ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
    [ ${#gpus[@]} -ge "$processes" ] \
      || die "--processes $processes needs as many GPUs; CUDA_VISIBLE_DEVICES lists ${#gpus[@]}"
  else
    for ((i = 0; i < processes; i++)); do gpus+=("$i"); done
  fi
fi

# setup_env.sh resolves a relative $PRMIM_VENV against the repository root.
venv="${PRMIM_VENV:-.venv}"
[[ "$venv" == /* ]] || venv="$repo/$venv"
main=("$venv/bin/python" -m prmim_jax.main --config "$config" --workdir "$workdir")

# Prints the command (--dry_run), or echoes it to stderr and runs it.
run() {
  if [ "$dry_run" = 1 ]; then
    join "$@"
  else
    echo "+ $(join "$@")" >&2
    "$@"
  fi
}

[ "$skip_setup" = 1 ] || run bash "$repo/launch/setup_env.sh" "$platform"

# On cuda, XLA's GPU flags (launch/lib.sh) go before the user's own XLA_FLAGS, which win.
if [ "$platform" = cuda ]; then
  xla_flags="$(xla_gpu_flags)"
  xla_flags="$xla_flags${XLA_FLAGS:+${xla_flags:+ }$XLA_FLAGS}"
  if [ -n "$xla_flags" ]; then
    line="export $(quote "XLA_FLAGS=$xla_flags")"
    if [ "$dry_run" = 1 ]; then
      echo "$line"
    else
      echo "+ $line" >&2
      export XLA_FLAGS="$xla_flags"
    fi
  fi
fi

if [ "$processes" = 1 ]; then
  if [ "$dry_run" = 1 ]; then
    join "${main[@]}" ${extra[@]+"${extra[@]}"}
    exit 0
  fi
  echo "+ $(join "${main[@]}" ${extra[@]+"${extra[@]}"})" >&2
  exec "${main[@]}" ${extra[@]+"${extra[@]}"}
fi

# Several processes on this machine, one coordinator on localhost.
if [ -z "$port" ]; then
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi

logs="$workdir/logs"
run mkdir -p "$logs"
pids=()
stop_all() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < processes; i++)); do
  cmd=()
  [ ${#gpus[@]} = 0 ] || cmd=(env "CUDA_VISIBLE_DEVICES=${gpus[$i]}")
  cmd+=("${main[@]}" --coordinator_address "localhost:$port" --num_processes "$processes" --process_id "$i")
  cmd+=(${extra[@]+"${extra[@]}"})
  log="$logs/process_$i.log"
  line="$(join "${cmd[@]}") > $(quote "$log") 2>&1 &"
  if [ "$dry_run" = 1 ]; then
    echo "$line"
  else
    echo "+ $line" >&2
    "${cmd[@]}" >"$log" 2>&1 &
    pids+=("$!")
  fi
done
if [ "$dry_run" = 1 ]; then
  echo "wait"
  exit 0
fi

# Wait for every process; the first failure stops the others (they would block
# in the coordinator) and sets the exit status.
status=0
finished=()
remaining="$processes"
while [ "$remaining" -gt 0 ]; do
  for ((i = 0; i < processes; i++)); do
    [ "${finished[$i]:-0}" = 0 ] || continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    finished[i]=1
    remaining=$((remaining - 1))
    if [ "$rc" != 0 ] && [ "$status" = 0 ]; then
      status="$rc"
      echo "$prog: process $i exited with status $rc; its log, $logs/process_$i.log, ends:" >&2
      tail -n 20 "$logs/process_$i.log" >&2 || true
      stop_all
    fi
  done
  [ "$remaining" = 0 ] || sleep 0.2
done
[ "$status" = 0 ] && echo "$prog: all $processes processes finished; logs in $logs" >&2
exit "$status"
