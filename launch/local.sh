#!/usr/bin/env bash
# Runs the training command on this machine.
#
#   bash launch/local.sh [--processes N] [--port P] [--grace S] [--skip_setup] [--dry_run]
#       CONFIG WORKDIR [main.py flags...]
#
# Creates the environment (bash launch/setup_env.sh PLATFORM; PLATFORM is
# $PRMIM_PLATFORM, else cuda where nvidia-smi exists, else cpu), then runs
#   $VENV/bin/python -m prmim_jax.main --config CONFIG --workdir WORKDIR [flags...]
# from the current directory. --processes N starts N processes on this machine,
# each with --coordinator_address localhost:PORT --num_processes N --process_id I
# (a free port unless --port) and its log in WORKDIR/logs/process_I.log; on cuda,
# process I sees only GPU I. On cuda, XLA_FLAGS starts with launch/lib.sh's GPU
# flags. On cpu, LD_PRELOAD starts with tcmalloc where it is installed (Debian's
# libtcmalloc-minimal4; PRMIM_TCMALLOC=0 turns that off, PRMIM_TCMALLOC=PATH names
# the library; see launch/README.md). The script waits for all of them. When
# one fails it prints that process's own error (from its log), stops the others
# and exits with the failed process's status. SIGTERM or Ctrl-C is passed on to every process as
# SIGTERM (they save a checkpoint and exit 0); the script waits up to --grace S
# seconds (default 120) for them, then kills them (SIGKILL), and exits 0 if all
# stopped cleanly (after a failure, the others get 10 s at most: they can save
# nothing more). A second Ctrl-C kills them at once. One process replaces the
# script (exec), so signals reach it directly. --dry_run (or DRY_RUN=1)
# prints the commands and runs nothing. Launch options may appear anywhere before
# `--`; everything after CONFIG WORKDIR that is not one goes to main.py.
set -euo pipefail

prog="launch/local.sh"
usage="usage: bash launch/local.sh [--processes N] [--port P] [--grace S] [--skip_setup] [--dry_run] CONFIG WORKDIR [main.py flags...]"

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

processes=1
port=""
grace=120
value_options=(--processes=processes --port=port --grace=grace)
parse_arguments "$@"

take_config_and_workdir
require_positive --processes "$processes"
case "$port" in *[!0-9]* | 0*) die "--port must be a port number, got '$port'" ;; esac
require_seconds --grace "$grace"
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
[ "$platform" != cpu ] || tcmalloc_library >/dev/null # a PRMIM_TCMALLOC that names no file fails before the set-up

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

[ "$skip_setup" = 1 ] || run bash "$repo/launch/setup_env.sh" "$platform"

# On cuda, XLA's GPU flags (launch/lib.sh) go before the user's own XLA_FLAGS, which win.
if [ "$platform" = cuda ]; then
  xla_flags="$(xla_gpu_flags)"
  xla_flags="$xla_flags${XLA_FLAGS:+${xla_flags:+ }$XLA_FLAGS}"
  [ -z "$xla_flags" ] || run_export XLA_FLAGS "$xla_flags"
fi

# On cpu, tcmalloc in place of glibc's malloc, before any LD_PRELOAD of the user's (launch/lib.sh's
# tcmalloc_library; PRMIM_TCMALLOC=0 turns it off). Looked up after setup_env.sh, which installs it.
if [ "$platform" = cpu ]; then
  tcmalloc="$(tcmalloc_library)"
  if [ -n "$tcmalloc" ]; then
    run_export LD_PRELOAD "$tcmalloc${LD_PRELOAD:+ $LD_PRELOAD}"
  elif ! tcmalloc_off; then
    echo "$prog: tcmalloc not found, so glibc's malloc, whose page faults cost about a third of a CPU run's" \
      "time; install Debian's libtcmalloc-minimal4 (setup_env.sh does, as root), or set PRMIM_TCMALLOC=0" >&2
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
if [ "$dry_run" = 0 ]; then
  # Each process's pid, and one line "I STATUS" per process in the order they end (see below).
  state="$(mktemp -d)"
  trap 'rm -rf "$state"' EXIT
  : >"$state/ended"
fi
pids=()
watchers=()
finished=()
stopping=0 # 1 once the processes were told to stop: by a signal to this script, or after a failure
deadline=0 # when they are killed if still running ($SECONDS)
failure_grace=$((grace < 10 ? grace : 10))
killed=0

signal_processes() { # SIGNAL: to every process started and still running
  local i
  for i in ${pids[@]+"${!pids[@]}"}; do
    [ "${finished[$i]:-0}" = 1 ] || kill -s "$1" "${pids[$i]}" 2>/dev/null || true
  done
}

stop_processes() { # SECONDS: SIGTERM to every process (once), SIGKILL to those still running after SECONDS
  local until=$((SECONDS + $1 + 1)) # $SECONDS counts whole seconds: at least that long
  if [ "$stopping" = 0 ] || [ "$until" -lt "$deadline" ]; then deadline="$until"; fi
  if [ "$stopping" = 0 ]; then
    stopping=1
    signal_processes TERM
  fi
}

on_signal() { # NAME
  if [ "$1" = INT ] && [ "$stopping" = 1 ]; then
    echo "$prog: SIGINT again: killing the processes now" >&2
    killed=1
    signal_processes KILL
    return
  fi
  echo "$prog: got SIG$1: passing SIGTERM on to the processes; waiting up to ${grace}s for them to save" \
    "a checkpoint (at a step they agree on) and end, then killing them" >&2
  stop_processes "$grace"
}
if [ "$dry_run" = 0 ]; then # before the first process starts: a signal from then on reaches them all
  trap 'on_signal TERM' TERM
  trap 'on_signal INT' INT
fi

for ((i = 0; i < processes; i++)); do
  cmd=()
  [ ${#gpus[@]} = 0 ] || cmd=(env "CUDA_VISIBLE_DEVICES=${gpus[$i]}")
  cmd+=("${main[@]}" --coordinator_address "localhost:$port" --num_processes "$processes" --process_id "$i")
  cmd+=(${extra[@]+"${extra[@]}"})
  log="$logs/process_$i.log"
  line="$(join "${cmd[@]}") > $(quote "$log") 2>&1 &"
  if [ "$dry_run" = 1 ]; then
    echo "$line"
    continue
  fi
  echo "+ $line" >&2
  # A watcher subshell starts process I and appends "I STATUS" to $state/ended when it ends, so that
  # the file lists the processes in the order they ended: the first failure is the cause, and the
  # peers that failed a moment later because of it are not mistaken for it.
  (
    "${cmd[@]}" >"$log" 2>&1 &
    child=$!
    trap '' INT TERM HUP # the watcher outlives signals sent to the whole group, to record the end
    echo "$child" >"$state/pid_$i"
    rc=0
    wait "$child" || rc=$?
    echo "$i $rc" >>"$state/ended"
  ) 2>/dev/null & # bash's own "Killed" notice; the process's output goes to its log
  watchers[i]=$!
done
if [ "$dry_run" = 1 ]; then
  echo "wait"
  exit 0
fi
for ((i = 0; i < processes; i++)); do
  while [ ! -s "$state/pid_$i" ]; do sleep 0.05; done
  pids[i]="$(<"$state/pid_$i")"
done
[ "$stopping" = 0 ] || signal_processes TERM # a signal that came while they were starting

# How a status reads: "status 1", "status 137, killed by SIGKILL".
describe_status() {
  local name
  if [ "$1" -gt 128 ] && name="$(kill -l "$(($1 - 128))" 2>/dev/null)"; then
    echo "status $1, killed by SIG$name"
  else
    echo "status $1"
  fi
}

# A watcher killed from outside (it ignores SIGTERM, not SIGKILL) can no longer record its process's
# end: record it as killed, and kill the process, so that the wait below cannot hang on it.
record_lost_watchers() {
  local i
  for ((i = 0; i < processes; i++)); do
    kill -0 "${watchers[$i]}" 2>/dev/null && continue
    grep -q "^$i " "$state/ended" && continue
    kill -KILL "${pids[$i]}" 2>/dev/null || true
    echo "$i 137" >>"$state/ended"
  done
}

# Wait for every process, in the order they end; the first failure sets the exit status and stops
# the others (they cannot go on without it, and would otherwise block in a collective).
status=0
first=""
ended=0
while [ "$ended" -lt "$processes" ]; do
  record_lost_watchers
  mapfile -t records <"$state/ended"
  while [ "$ended" -lt "${#records[@]}" ]; do
    read -r i rc <<<"${records[$ended]}"
    ended=$((ended + 1))
    finished[i]=1
    [ "$rc" != 0 ] || continue
    if [ -n "$first" ]; then
      echo "$prog: process $i exited with $(describe_status "$rc") after process $first failed" >&2
      continue
    fi
    first="$i"
    status="$rc"
    how="$(describe_status "$rc")"
    [ "$killed" = 0 ] || how+=", sent by this script"
    echo "$prog: process $i failed first ($how); its own error, from $logs/process_$i.log:" >&2
    show_error "$logs/process_$i.log" >&2
    # Without process $i the others can save nothing more: time to print their own errors is all they need.
    [ "$ended" = "$processes" ] || echo "$prog: stopping the others (SIGTERM, and SIGKILL after ${failure_grace}s)" >&2
    stop_processes "$failure_grace"
  done
  if [ "$ended" -lt "$processes" ]; then
    kill_after_deadline "processes still running at the end of the grace period; killing them (SIGKILL)" \
      signal_processes KILL
    sleep 0.1
  fi
done
wait # the watchers, which end right after their processes
if [ "$status" = 0 ]; then
  if [ "$stopping" = 1 ]; then
    echo "$prog: all $processes processes stopped cleanly; rerun the same command to resume; logs in $logs" >&2
  else
    echo "$prog: all $processes processes finished; logs in $logs" >&2
  fi
fi
exit "$status"
