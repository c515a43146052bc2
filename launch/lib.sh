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
