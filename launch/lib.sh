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

# Parses a launcher's arguments. The caller sets the defaults of its own options and lists those that
# take a value in $value_options, each as "--name=variable" ("--name=variable[]" for one that may be
# given again, each value appended to the array); every one may be given as `--name value` or
# `--name=value`. Shared by all launchers: -h/--help (prints the script's header comment and exits),
# --dry_run (or DRY_RUN=1) sets $dry_run, --skip_setup sets $skip_setup, `--` ends the options, and
# the other arguments fill $positional (CONFIG WORKDIR) and $extra (main.py flags), see add_argument.
parse_arguments() {
  dry_run=0
  case "${DRY_RUN:-0}" in "" | 0 | false | no) ;; *) dry_run=1 ;; esac
  skip_setup=0
  positional=()
  extra=()
  local variable arg
  while [ $# -gt 0 ]; do
    case "$1" in
      -h | --help) print_help; exit 0 ;;
      --dry_run | --dry-run) dry_run=1 ;;
      --skip_setup) skip_setup=1 ;;
      --)
        shift
        for arg in "$@"; do add_argument "$arg" after_dashes; done
        break ;;
      --*)
        if ! variable="$(option_variable "${1%%=*}")"; then
          add_argument "$1"
        elif [[ "$1" == *=* ]]; then
          set_option "$variable" "${1#*=}"
        else
          [ $# -ge 2 ] || die "$1 needs a value"
          set_option "$variable" "$2"
          shift
        fi ;;
      *) add_argument "$1" ;;
    esac
    shift
  done
}

# Prints the header comment of the script that sourced this file: its lines 2 to `set -euo pipefail`.
print_help() {
  sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p;}' "${BASH_SOURCE[-1]}"
}

# Prints the variable that option $1 (--name) sets, from $value_options; fails for any other option.
option_variable() {
  local declared
  for declared in ${value_options[@]+"${value_options[@]}"}; do
    if [ "${declared%%=*}" = "$1" ]; then
      printf '%s\n' "${declared#*=}"
      return 0
    fi
  done
  return 1
}

# Sets variable $1 to $2, or appends $2 to array $1 when $1 ends in [].
set_option() {
  if [[ "$1" == *"[]" ]]; then
    local -n values="${1%"[]"}"
    values+=("$2")
  else
    printf -v "$1" '%s' "$2"
  fi
}

# Whether $1 is a positive whole number (no sign, no leading zero).
positive() {
  case "$1" in "" | *[!0-9]* | 0*) return 1 ;; esac
}

# Dies unless option $1's value $2 is a positive whole number.
require_positive() {
  positive "$2" || die "$1 must be a positive integer, got '$2'"
}

# Dies unless option $1 (named "--name WHAT" in the message) was given: $2 is its value.
require_option() {
  [ -n "$2" ] || die "missing $1"
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

# Prints the path of Debian's tcmalloc (libtcmalloc_minimal.so.4, package libtcmalloc-minimal4) as the
# dynamic linker finds it (ldconfig -p), or nothing.
find_tcmalloc() {
  { PATH="$PATH:/usr/sbin:/sbin" ldconfig -p 2>/dev/null || true; } \
    | awk '$1 == "libtcmalloc_minimal.so.4" && !found { print $NF; found = 1 }'
}

# Whether $PRMIM_TCMALLOC turns the preload off (0, false or no).
tcmalloc_off() {
  case "${PRMIM_TCMALLOC:-}" in 0 | false | no) return 0 ;; esac
  return 1
}

# Prints the tcmalloc library the launchers preload on cpu in place of glibc's malloc, or nothing when it
# is off or not installed. PRMIM_TCMALLOC: 0 (or false, no) turns it off; a path names the library (dies
# if no file is there); unset, empty or 1 finds Debian's (find_tcmalloc). With glibc's malloc, XLA:CPU
# maps and unmaps its large per-step buffers every step and the kernel zeroes their fresh pages each
# time: about a third of the main job's time (benchmarks/results/allocator_cpu.md, launch/README.md).
tcmalloc_library() {
  tcmalloc_off && return 0
  case "${PRMIM_TCMALLOC:-}" in
    */*)
      [ -f "$PRMIM_TCMALLOC" ] || die "PRMIM_TCMALLOC names no file: $PRMIM_TCMALLOC"
      printf '%s\n' "$PRMIM_TCMALLOC" ;;
    *) find_tcmalloc ;;
  esac
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

# Dies unless option $1's value $2 is a positive whole number of seconds (--grace S).
require_seconds() {
  positive "$2" || die "$1 must be a positive number of seconds, got '$2'"
}

# Prints the command (--dry_run), or echoes it to stderr and runs it.
run() {
  if [ "$dry_run" = 1 ]; then
    join "$@"
  else
    echo "+ $(join "$@")" >&2
    "$@"
  fi
}

# Exports variable $1 with value $2; --dry_run prints the export instead.
run_export() {
  local line
  line="export $(quote "$1=$2")"
  if [ "$dry_run" = 1 ]; then
    echo "$line"
  else
    echo "+ $line" >&2
    export "$1=$2"
  fi
}

# Once the processes were told to stop ($stopping = 1) and the stop's $deadline ($SECONDS) has passed,
# unless that was done already ($killed): prints message $1, sets $killed and runs the rest of the
# arguments, the script's way of sending SIGKILL.
kill_after_deadline() {
  if [ "$stopping" = 1 ] && [ "$killed" = 0 ] && [ "$SECONDS" -ge "$deadline" ]; then
    echo "$prog: $1" >&2
    killed=1
    "${@:2}"
  fi
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
