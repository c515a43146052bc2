# Shared helpers of the launch scripts; sourced, never run. The caller sets $prog and $usage.

die() {
  echo "$prog: error: $*" >&2
  echo "$usage" >&2
  exit 2
}

# Quotes one argument for a POSIX shell, as Python's shlex.quote does.
quote() {
  local arg="$1"
  if [[ -n "$arg" && "$arg" != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$arg"
  else
    printf "'%s'" "${arg//\'/\'\\\'\'}"
  fi
}

# Prints its arguments as one shell command line.
join() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s\n' "$out"
}

# Files one argument that is not a launch option into $positional (CONFIG, WORKDIR) or, after
# those two, $extra (main.py flags). Before CONFIG WORKDIR an unknown option is an error, unless
# it came after `--` (second argument "after_dashes").
add_argument() {
  if [ ${#positional[@]} -lt 2 ]; then
    if [ "${2:-}" != after_dashes ]; then
      case "$1" in -*) die "unknown option '$1' (main.py flags go after CONFIG WORKDIR)" ;; esac
    fi
    positional+=("$1")
  else
    extra+=("$1")
  fi
}

# Sets $config, $workdir, $config_file (CONFIG without its ':arg') and $config_arg (':arg' or
# empty) from $positional, or dies.
take_config_and_workdir() {
  [ ${#positional[@]} -ge 1 ] || die "missing CONFIG and WORKDIR"
  [ ${#positional[@]} -ge 2 ] || die "missing WORKDIR"
  config="${positional[0]}"
  workdir="${positional[1]}"
  [ -n "$config" ] || die "CONFIG is empty"
  [ -n "$workdir" ] || die "WORKDIR is empty"
  # CONFIG may carry get_config's argument: configs/name.py:arg.
  config_file="$config"
  config_arg=""
  if [[ "$config" == *.py:* ]]; then
    config_file="${config%%.py:*}.py"
    config_arg=":${config#*.py:}"
  fi
  [ -f "$config_file" ] || die "config file not found: $config_file"
}

# Prints the XLA flags the launchers set on GPU (cuda), one line, space-separated; callers put
# them before the user's own $XLA_FLAGS, so that a flag given there wins (XLA reads the last).
# PRMIM_XLA_GPU_FLAGS, when set (even empty), replaces them. Each flag is measured by the device
# check (benchmarks/device_check.sh, table (d)) against XLA's defaults; see launch/README.md.
xla_gpu_flags() {
  if [ -n "${PRMIM_XLA_GPU_FLAGS+set}" ]; then
    printf '%s\n' "$PRMIM_XLA_GPU_FLAGS"
    return
  fi
  local flags=(
    # Off by default in XLA (jax 0.11); JAX's and NVIDIA's GPU performance guides recommend it: it
    # schedules the gradient all-reduce of data-parallel training to overlap the backward pass.
    # One GPU has no collective to hide, so the single-GPU device check can only show it costs
    # nothing there; the gain needs a multi-GPU measurement.
    --xla_gpu_enable_latency_hiding_scheduler=true
  )
  printf '%s\n' "${flags[*]}"
}

# Whether $1 is a positive whole number of seconds (--grace S).
seconds() {
  case "$1" in "" | *[!0-9]* | 0*) return 1 ;; esac
}

# The line a failing process prints first (prmim_jax.preemption.FAILURE_LINE):
# "process I of N failed: Type: message", then its traceback.
FAILURE_PATTERN='^process [0-9]+ of [0-9]+ failed: '

# Prints a process's own error from its log: its failure line and the end of the traceback after it.
# A log without one (a process killed by a signal, or that died in native code) ends the way it ends.
show_error() {
  local log="$1" at
  at="$(grep -n -E -m 1 "$FAILURE_PATTERN" "$log" 2>/dev/null | cut -d: -f1)" || true
  if [ -n "$at" ]; then
    sed -n "${at}p" "$log"
    tail -n +"$((at + 1))" "$log" | tail -n 15
  else
    tail -n 20 "$log" 2>/dev/null || true
  fi
}
