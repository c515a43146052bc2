#!/usr/bin/env bash
# The main job with glibc's malloc against tcmalloc (the launcher's preload), side by side:
#
#   bash benchmarks/allocator.sh [--rounds R] [--steps N] [OUT]
#
# Runs `launch/local.sh --skip_setup configs/pretrain_fmnist.py:steps=N --config.log_every=N/2`
# (default 100 steps: the main job's model, batch, progress lines and final kNN, a fifth of its steps) R times (default 2) in each of
# three ways, one after another in turn (glibc, tcmalloc, tunables, glibc, ...), so that a change
# in the machine's load falls on all three alike:
#   glibc     PRMIM_TCMALLOC=0: glibc's malloc as it is
#   tcmalloc  the launcher's default: LD_PRELOAD of Debian's libtcmalloc-minimal4
#   tunables  PRMIM_TCMALLOC=0 and GLIBC_TUNABLES=$TUNABLES: glibc never maps a block of its own
#             (mmap_max=0) and keeps what is freed (a 16 GiB trim threshold), the strongest setting
#             glibc's tunables offer, to see whether they would do without a new package
# each under /usr/bin/time -v. Writes OUT (default benchmarks/results/allocator_cpu.md): the
# command, the machine, one row a run (wall, user and sys seconds, the share of the cores it got,
# minor page faults, images/s at the middle and the last step), each way's medians and their ratios to glibc's, and whether all
# runs printed the same losses and kNN accuracy; the runs' logs go beside it (OUT less .md, .logs/).
# The python is $PRMIM_VENV's (default .venv), as the launcher's.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
prog="benchmarks/allocator.sh"
usage="usage: bash benchmarks/allocator.sh [--rounds R] [--steps N] [OUT]"
source "$repo/launch/lib.sh"

rounds=2
steps=100
value_options=(--rounds=rounds --steps=steps)
parse_arguments "$@"
require_positive --rounds "$rounds"
require_positive --steps "$steps"
[ "$steps" -ge 2 ] || die "--steps must be at least 2 (a middle and a last step)"
[ ${#positional[@]} -le 1 ] && [ ${#extra[@]} = 0 ] || die "one OUT at most"
[ "$dry_run" = 0 ] && [ "$skip_setup" = 0 ] || die "no --dry_run or --skip_setup here: it runs the set-up never and the jobs always"
out="${positional[0]:-$repo/benchmarks/results/allocator_cpu.md}"
[ -x /usr/bin/time ] || die "needs GNU time (/usr/bin/time, Debian's package time)"
tcmalloc="$(find_tcmalloc)"
[ -n "$tcmalloc" ] || die "needs tcmalloc (Debian's libtcmalloc-minimal4; bash launch/setup_env.sh installs it as root)"
TUNABLES="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
venv="${PRMIM_VENV:-.venv}"
[[ "$venv" == /* ]] || venv="$repo/$venv"

config="configs/pretrain_fmnist.py:steps=$steps"
middle=$((steps / 2))
logs="${out%.md}.logs"
rm -rf "$logs"
mkdir -p "$logs"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# One run: WAY ROUND. Appends "WAY ROUND WALL USER SYS FAULTS RATE_MIDDLE RATE_LAST CPU" to $scratch/rows.
measure() {
  local way="$1" round="$2" log="$logs/$1_$2.log" timing="$logs/$1_$2.time"
  local environment=(PRMIM_TCMALLOC=0 GLIBC_TUNABLES=)
  case "$way" in
    tcmalloc) environment=(PRMIM_TCMALLOC=1 GLIBC_TUNABLES=) ;;
    tunables) environment=(PRMIM_TCMALLOC=0 "GLIBC_TUNABLES=$TUNABLES") ;;
  esac
  echo "$prog: round $round of $rounds: $way" >&2
  (cd "$repo" && env "${environment[@]}" /usr/bin/time -v -o "$timing" \
    bash launch/local.sh --skip_setup "$config" "$scratch/${way}_$round" --config.log_every="$middle") >"$log" 2>&1 \
    || { echo "$prog: the $way run of round $round failed; its log: $log" >&2; exit 1; }
  # GNU time writes "\tName (unit): value" lines; the wall clock as h:mm:ss or m:ss.ss.
  local wall user sys faults rate_middle rate_last cpu
  wall="$(sed -n 's/^.*Elapsed (wall clock) time.*: //p' "$timing" | awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s }')"
  user="$(sed -n 's/^.*User time (seconds): //p' "$timing")"
  sys="$(sed -n 's/^.*System time (seconds): //p' "$timing")"
  faults="$(sed -n 's/^.*Minor (reclaiming a frame) page faults: //p' "$timing")"
  cpu="$(sed -n 's/^.*Percent of CPU this job got: //p' "$timing")"
  rate_middle="$(sed -n "s#^step $middle/$steps | .* | \([0-9,]*\) img/s | .*#\1#p" "$log" | tr -d ,)"
  rate_last="$(sed -n "s#^step $steps/$steps | .* | \([0-9,]*\) img/s | .*#\1#p" "$log" | tr -d ,)"
  echo "$way $round $wall $user $sys $faults $rate_middle $rate_last $cpu" >>"$scratch/rows"
}

for ((round = 1; round <= rounds; round++)); do
  for way in glibc tcmalloc tunables; do measure "$way" "$round"; done
done

# Every loss a run printed (each progress line's) and its final kNN line, one line a run, each different one once.
for log in "$logs"/*.log; do
  printf '%s; %s\n' "$(grep -o 'loss [0-9.]*' "$log" | paste -sd ' ')" "$(grep '^final kNN' "$log")"
done | sort -u >"$scratch/results"

{
  echo "# The main job's memory allocator on CPU: glibc's malloc against tcmalloc"
  echo
  echo "Written by \`bash benchmarks/allocator.sh --rounds $rounds --steps $steps\` (issue 25, item 6), whose runs are"
  echo
  echo '```'
  echo "/usr/bin/time -v bash launch/local.sh --skip_setup $config WORKDIR --config.log_every=$middle"
  echo '```'
  echo
  echo "in three ways, in turn, $rounds round(s): glibc, with \`PRMIM_TCMALLOC=0\`; tcmalloc, as the launcher runs it"
  echo "by default, preloading \`$tcmalloc\`; tunables, with"
  echo "\`PRMIM_TCMALLOC=0 GLIBC_TUNABLES=$TUNABLES\`."
  echo "The runs' logs and GNU time's reports are in \`$(basename "$logs")/\`."
  echo
  echo "Machine: $(nproc) cores of $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1),"
  echo "$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(. /etc/os-release && echo "$PRETTY_NAME"),"
  echo "glibc $(ldd --version | sed -n '1s/.* //p'), jax $("$venv/bin/python" -c 'import jax; print(jax.__version__)'),"
  echo "commit $(git -C "$repo" describe --always --dirty), $(date -u +%Y-%m-%d)."
  echo
  echo "The machine is shared with other work, so wall time and images/s move with its load from run to"
  echo "run (CPU % is GNU time's, 100% being one core fully used, so $((100 * $(nproc)))% a machine to itself); the"
  echo "page faults, the system time and the CPU time (user + sys) are what the allocator changes, and what"
  echo "compares across runs. Images/s at step $middle include the first step's compilation; at step $steps"
  echo "they are steps $((middle + 1)) to $steps alone."
  echo
  python3 - "$scratch/rows" "$middle" "$steps" <<'PY'
import statistics
import sys

rows = [line.split() for line in open(sys.argv[1])]
middle, steps = sys.argv[2:]
print(
    f"| allocator | round | wall s | user s | sys s | user + sys s | CPU % | minor page faults | img/s step {middle} "
    f"| img/s step {steps} |"
)
print("|---|---|---|---|---|---|---|---|---|---|")
for way, round_, wall, user, system, faults, rate_middle, rate_last, cpu in rows:
    total = f"{float(user) + float(system):.1f}"
    cells = [way, round_, f"{float(wall):.1f}", user, system, total, cpu, f"{int(faults):,}", rate_middle, rate_last]
    print("| " + " | ".join(cells) + " |")
print()
print("Medians over the rounds, and in brackets each one's ratio to glibc's:")
print()
print(f"| allocator | wall s | user s | sys s | user + sys s | minor page faults | img/s step {steps} |")
print("|---|---|---|---|---|---|---|")
columns = {
    "wall": lambda row: float(row[2]),
    "user": lambda row: float(row[3]),
    "sys": lambda row: float(row[4]),
    "cpu": lambda row: float(row[3]) + float(row[4]),
    "faults": lambda row: float(row[5]),
    "rate": lambda row: float(row[7]),
}
medians = {
    way: {name: statistics.median(value(row) for row in rows if row[0] == way) for name, value in columns.items()}
    for way in ("glibc", "tcmalloc", "tunables")
}
for way, median in medians.items():
    cells = []
    for name, value in median.items():
        text = f"{value:,.0f}" if name == "faults" else f"{value:.1f}"
        cells.append(text if way == "glibc" else f"{text} ({value / medians['glibc'][name]:.2f}x)")
    print(f"| {way} | " + " | ".join(cells) + " |")
PY
  echo
  if [ "$(wc -l <"$scratch/results")" = 1 ]; then
    echo "All $((3 * rounds)) runs printed the same losses (every progress line's) and the same final kNN"
    echo "accuracies, to the last digit (from their logs):"
  else
    echo "The runs did NOT all print the same losses and kNN accuracies; each different line, from the logs:"
  fi
  echo
  echo '```'
  cat "$scratch/results"
  echo '```'
} >"$out"
echo "$prog: wrote $out" >&2
